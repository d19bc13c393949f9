"""Many writers, one relay, one SQLite file: 20 OS processes queue 500 mails each while the relay consumes.

Half the writers go through ``SqliteEngine.send(outbound, to_message(OutboundMail(...)))`` (as every
engine user does); the other half write rows as ``opsrelay-sendmail`` does on the
embedded engine (``relay.sendmail.outbound.write_row`` then ``sqlite_wake.poke``), so both writers of the file contend
for its lock. The relay is ``serve_forever`` on the test's loop with a RecordingMailer. Every mail
must be sent exactly once (reconciled by its Message-ID) and the file must end with no row at all,
ready or leased.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from relay.config.models import Config
from relay.contract.names import dead_queue, document_queues, outbound_queue
from relay.daemon.serve import serve_forever
from tests.brokers import unique_prefix
from tests.doubles import RecordingMailer
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(90)

WRITERS = 20
PER_WRITER = 500
# The whole run (publishing and delivery) must finish in this many seconds.
BOUND = 60.0
ROOT = Path(__file__).resolve().parents[2]

# argv: db path, prefix, writer number, count. Prints "ready", waits for a line on stdin, queues, prints "done N".
WRITER = r"""
import asyncio, sys
from relay.engines.sqlite import SqliteEngine
from relay.contract.mail import OutboundMail, to_message
from relay.contract.envelope import mail_headers
from relay.engines.sqlite_wake import poke
from relay.sendmail.outbound import write_row
from relay.contract.topology import full_topology
from relay.contract.names import outbound_queue

path, prefix, writer, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
queue = outbound_queue(prefix)
sender, rcpts = "cron@writers.test", (f"w{writer}@example.com",)

def raw(mail_id):
    return (f"From: {sender}\r\nTo: {rcpts[0]}\r\nSubject: {mail_id}\r\n"
            f"Message-ID: <{mail_id}@writers.test>\r\n\r\nmail {mail_id}\r\n").encode()

async def via_engine():
    engine = SqliteEngine("sqlite:///" + path)
    await engine.connect()
    await engine.declare(full_topology(prefix, [], []))  # as sendmail's engine path does
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for i in range(count):
        mail_id = f"w{writer}-{i}"
        await engine.send(queue, to_message(OutboundMail(sender, rcpts, raw(mail_id), message_id=mail_id,
                                                         origin="sendmail")))
    await engine.close()

def via_sendmail():
    print("ready", flush=True)
    sys.stdin.readline()
    headers = mail_headers(sender, rcpts, origin="sendmail")
    for i in range(count):
        mail_id = f"w{writer}-{i}"
        write_row(path, queue, raw(mail_id), mail_id, headers, 15.0)
        poke(path, [queue])

if writer % 2:
    via_sendmail()
else:
    asyncio.run(via_engine())
print(f"done {count}", flush=True)
"""

MESSAGE_ID = re.compile(rb"^Message-ID: <([^@>]+)@writers\.test>\r$", re.MULTILINE)


def rows_left(db: Path, prefix: str) -> int:
    """Every row of the file, ready or leased, in any queue but the relay's documents (a reader never
    blocks WAL writers)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM messages WHERE queue NOT IN (?, ?)",
                                document_queues(prefix)).fetchone()[0])


async def start_writer(db: Path, prefix: str, writer: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(db), prefix, str(writer), str(PER_WRITER),
        cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if line != b"ready\n":
        _, err = await proc.communicate()
        raise AssertionError(f"writer {writer} did not start: {line!r} {err.decode(errors='replace')}")
    return proc


async def finish(proc: asyncio.subprocess.Process, writer: int) -> float:
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"writer {writer} exited {proc.returncode}: {err.decode(errors='replace')}"
    assert out.decode().split() == ["done", str(PER_WRITER)], out
    return time.monotonic()


async def test_twenty_writers_every_mail_delivered_exactly_once(tmp_path: Path) -> None:
    db = (tmp_path / "queue.db").absolute()
    prefix = unique_prefix()
    config = Config.model_validate({
        "host": "concurrency",
        "broker": {"url": f"sqlite:///{db}", "prefix": prefix},
        "smtp": {"host": "127.0.0.1", "port": 2525, "security": "none", "from": "relay@writers.test",
                 "pool_size": 4},
        "retry": {"backoff": ["1s"]},
    })
    mailer = RecordingMailer()
    stop = asyncio.Event()
    relay = asyncio.create_task(serve_forever(config, mailer, stop), name="relay")
    writers: list[asyncio.subprocess.Process] = []
    try:
        writers = list(await asyncio.gather(*(start_writer(db, prefix, w) for w in range(WRITERS))))
        for proc in writers:  # all at once: they start on the same line
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        started = time.monotonic()
        published = asyncio.gather(*(finish(p, w) for w, p in enumerate(writers)))
        # How much the relay had sent when the last writer was done: it must consume while they write.
        sent_meanwhile: list[int] = []
        published.add_done_callback(lambda _: sent_meanwhile.append(len(mailer.sent)))

        total = WRITERS * PER_WRITER

        def all_sent() -> bool:
            assert not relay.done(), f"the relay ended: {relay.exception() if relay.done() else ''}"
            return len(mailer.sent) >= total and not rows_left(db, prefix) and published.done()

        def progress() -> str:
            return (f"{len(mailer.sent)} of {total} sent, {rows_left(db, prefix)} row(s) in the file, "
                    f"writers {'done' if published.done() else 'still running'}")

        await wait_until(all_sent, started + BOUND - time.monotonic(), what="every mail to be sent",
                         diagnostics=progress, interval=0.05)
        last_publish = max(await published)
        drained = time.monotonic()
    finally:
        for proc in writers:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        stop.set()
        await asyncio.wait_for(relay, 30)

    print(f"\n{total} mails from {WRITERS} processes: queued in {last_publish - started:.1f}s "
          f"({total / (last_publish - started):.0f}/s), all sent in {drained - started:.1f}s "
          f"({total / (drained - started):.0f}/s); {sent_meanwhile[0]} already sent when the last writer "
          f"finished")

    copies = Counter(m.group(1).decode() for mail in mailer.sent for m in [MESSAGE_ID.search(mail.raw)] if m)
    published_ids = {f"w{w}-{i}" for w in range(WRITERS) for i in range(PER_WRITER)}
    twice = sorted(i for i, n in copies.items() if n > 1)
    assert not twice, f"{len(twice)} mail(s) sent more than once, e.g. {twice[:10]}"
    missing = sorted(published_ids - set(copies))
    assert not missing, f"{len(missing)} mail(s) never sent, e.g. {missing[:10]}"
    assert set(copies) == published_ids
    assert len(mailer.sent) == total
    assert len(mailer.attempts) == total  # no retries: one attempt per mail
    for mail in mailer.sent:
        mail_id = MESSAGE_ID.search(mail.raw)
        assert mail_id is not None
        writer = mail_id.group(1).decode().partition("-")[0]
        assert mail.recipients == (f"{writer}@example.com",)
        assert mail.sender == "cron@writers.test"
    # Stopped: every lease returned or acked, nothing in outbound, a retry queue or the dead letters.
    assert rows_left(db, prefix) == 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        queues = {r[0] for r in conn.execute("SELECT name FROM queues")}
    assert {outbound_queue(prefix), dead_queue(prefix)} <= queues
    assert sent_meanwhile[0] > 0, "the relay sent nothing while the writers were writing"
