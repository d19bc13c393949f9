"""``python -m relay.sendmail``: the same as ``opsrelay-sendmail``."""

import sys

from relay.sendmail.main import main

sys.exit(main(["opsrelay-sendmail", *sys.argv[1:]]))
