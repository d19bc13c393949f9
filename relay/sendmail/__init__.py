"""``opsrelay-sendmail``: argv (:mod:`.args`), the message (:mod:`.prep`, :mod:`.addresses`), the
queue path (:mod:`.main`, standard library only on the embedded queue), the slow paths (:mod:`.slow`).

Imports nothing itself: the console script is ``relay.sendmail.main:main``."""
