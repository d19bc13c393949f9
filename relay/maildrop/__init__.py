"""The maildrop: how a user who cannot write the queue still sends mail, without setuid programs.

:mod:`.drop` writes one file per submission into a root-owned mode-1733 directory (anyone may
create a file, nobody may list, read or remove another's); :mod:`.ingest` is the relay's side:
it checks each file (no links, owner equals the uid inside, regular, bounded), applies the
queue path's rules for that user, queues the mail durably, and only then removes the file.
Imports nothing itself."""
