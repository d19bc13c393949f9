"""The configuration: one loader (:mod:`.loader`), the rules of each value (:mod:`.rules`), the
pydantic models (:mod:`.models`), the sendmail fast view (:mod:`.fast`), ssmtp.conf and crashmail flags.

Imports nothing itself, so the sendmail path can take :mod:`.fast` without pydantic."""
