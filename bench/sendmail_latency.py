"""Submission latency: ``opsrelay-sendmail -t -i`` against msmtp and ssmtp, same message, same server.

Each row is the whole-process wall time of one submission, from spawn to exit, as a cron job or
a monitoring script pays it: the same ~2 KB report on stdin, ``-t -i`` (recipients from the
headers, a lone dot is data). The server is :class:`bench.retry_load.Smarthost` (aiosmtpd,
trustme certificate, STARTTLS required, AUTH only over TLS) in a process of its own; it stamps
each mail with ``time.monotonic()`` and checks it came over TLS after AUTH.

* ``opsrelay-sendmail``: the virtualenv's console script, queue mode on the embedded engine
  (config through ``OPSRELAY_CONFIG``): it writes the mail to the sqlite queue (fsynced) and pokes
  the relay. ``opsrelay serve`` runs beside it as deployed and delivers each mail; the bench waits
  for it, so every mail is checked to arrive.
* ``msmtp``: a temporary config file (tls, tls_starttls, tls_trust_file = the server's CA, auth).
* ``ssmtp``: a temporary ssmtp.conf via ``-C`` (UseSTARTTLS, AuthUser/AuthPass, TLS_CA_File). It
  sleeps one second at the end of its input, so it runs fewer times.
* ``python -c pass``: the virtualenv's interpreter start, the floor for any Python submission.

The clients take turns run by run (each round starting with the next one), and each run waits
until the server has its mail before the next starts, so no run pays for another's delivery.
At the end msmtp and ssmtp are each run once more with a CA that did not sign the server's
certificate, to show which of them verifies it.

``python -m bench.sendmail_latency`` runs the benchmark alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import REPO, child_env, percentile, print_table, tail, unique_prefix
from bench.retry_load import HELO, PASSWORD, USER, SmarthostChild, deployed_env

__all__ = ["run"]

VENV_BIN = REPO / ".venv" / "bin"
SENDER = "backup@web1.example.com"
RECIPIENT = "oncall@example.com"
TARGET = 0.5  # opsrelay's median at most half of msmtp's
BODY_LINES = [f"  /srv/data/volume{n:02d}  {n * 37 % 900 + 100:4d} GB  {n * 13 % 60:2d} min  ok  "
              f"snapshot backup-2026-11-27-{n:02d}" for n in range(1, 28)]


def message(seq: int) -> bytes:
    """A nightly backup report (~2 KB), as cron mails it: no Date or Message-ID, each client adds its own."""
    lines = [f"From: Backup Job <{SENDER}>", f"To: {RECIPIENT}",
             "Subject: [web1] nightly backup report: 27 volumes, 0 failed", f"X-Bench-Seq: {seq:06d}",
             "Content-Type: text/plain; charset=us-ascii", "",
             "Nightly backup on web1 finished.", "", *BODY_LINES, "",
             "Totals: 27 volumes, 0 failed, 0 skipped.", "-- ", "backup.sh on web1 (cron)"]
    return ("\n".join(lines) + "\n").encode()


@dataclass
class Client:
    name: str
    argv: list[str]
    env: dict[str, str]
    delivers: bool = True  # a mail must reach the server for each run
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    to_server: list[float] = field(default_factory=list)
    failures: int = 0


def _write_configs(work: Path, server: SmarthostChild, ca: Path, prefix: str) -> dict[str, Path]:
    """opsrelay.toml, an msmtp config and an ssmtp.conf, all for the same server, account and sender."""
    smtp = {"host": "127.0.0.1", "port": server.port, "security": "starttls", "username": USER,
            "password": PASSWORD, "ca_file": str(server.ca), "helo": HELO, "from": SENDER}
    paths = {}
    for name in ("opsrelay", "opsrelay-alone"):  # the second queue file has no relay consuming it
        url = f"sqlite:///{work / name}.db"
        paths[name] = work / f"{name}.toml"
        paths[name].write_text(f'host = "web1"\n\n[broker]\nurl = {json.dumps(url)}\nprefix = "{prefix}"\n\n'
                               "[smtp]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in smtp.items()),
                               encoding="utf-8")
    for name, trust in (("", server.ca), ("-untrusted", ca)):
        msmtprc = work / f"msmtprc{name}"
        msmtprc.write_text("\n".join([
            "account bench", "host 127.0.0.1", f"port {server.port}", "tls on", "tls_starttls on",
            f"tls_trust_file {trust}", "auth on", f"user {USER}", f"password {PASSWORD}", f"from {SENDER}",
            f"domain {HELO}", "account default : bench", ""]), encoding="utf-8")
        msmtprc.chmod(0o600)  # msmtp refuses a config holding a password that others may read
        # Debian's ssmtp 2.64: mailhub host:port, LOGIN auth; TLS_CA_File is loaded but never checked.
        ssmtp = work / f"ssmtp{name}.conf"
        ssmtp.write_text("\n".join([
            "root=postmaster", f"mailhub=127.0.0.1:{server.port}", "UseSTARTTLS=YES", f"AuthUser={USER}",
            f"AuthPass={PASSWORD}", f"TLS_CA_File={trust}", f"hostname={HELO}", "FromLineOverride=YES", ""]),
            encoding="utf-8")
        ssmtp.chmod(0o600)
        paths[f"msmtp{name}"], paths[f"ssmtp{name}"] = msmtprc, ssmtp
    return paths


def _spawn(argv: Sequence[str], env: dict[str, str], stdin_path: Path) -> tuple[int, float, float, float, str]:
    """Run one submission: exit status, monotonic start, wall seconds, CPU seconds (user+system), stderr."""
    with stdin_path.open("rb") as stdin:
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        done = subprocess.run(argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                              cwd=stdin_path.parent, timeout=60, check=False)
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = after.ru_utime - cpu.ru_utime + after.ru_stime - cpu.ru_stime
    return done.returncode, started, wall, used, done.stderr.decode(errors="replace").strip()


class Bench:
    def __init__(self, server: SmarthostChild, work: Path) -> None:
        self.server, self.work = server, work
        self.taken = 0  # distinct mails the server took since its mark
        self.seq = 0

    async def once(self, client: Client, *, record: bool) -> None:
        self.seq += 1
        path = self.work / "message.eml"
        path.write_bytes(message(self.seq))
        code, started, wall, cpu, err = _spawn(client.argv, client.env, path)
        if code != 0:
            raise RuntimeError(f"{client.name} exited {code}: {err}")
        arrived = None
        if client.delivers:
            window = await self.server.wait(self.taken + 1, within=30.0)
            if window.received != self.taken + 1 or window.insecure or window.duplicates:
                raise RuntimeError(f"{client.name}: its mail did not reach the server over TLS + AUTH "
                                   f"(taken {window.received}, expected {self.taken + 1}, "
                                   f"{window.insecure} insecure, {window.duplicates} twice)")
            self.taken += 1
            arrived = window.last - started
        if record:
            client.walls.append(wall)
            client.cpus.append(cpu)
            if arrived is not None:
                client.to_server.append(arrived)

    async def delivers_with_untrusted_ca(self, argv: list[str], env: dict[str, str]) -> tuple[int, bool]:
        """Exit status, and whether the mail reached the server although the client trusts another CA."""
        self.seq += 1
        path = self.work / "message.eml"
        path.write_bytes(message(self.seq))
        code = _spawn(argv, env, path)[0]
        window = await self.server.wait(self.taken + 1, within=3.0)
        arrived = window.received > self.taken
        self.taken = window.received
        return code, arrived


def _logged(log: Path, line: bytes) -> bool:
    return line in log.read_bytes()


async def _relay(config: Path, log: Path) -> asyncio.subprocess.Process:
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "opsrelay"), "serve", "--config", str(config), stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr, cwd=REPO, env=deployed_env())
    deadline = time.monotonic() + 30
    while not _logged(log, b"relay: consuming"):
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"opsrelay serve did not start:\n{tail(log)}")
        await asyncio.sleep(0.05)
    return proc


def _queued(path: Path) -> int:
    """Messages in the file's queues (the relay-less one: every submission must still be there)."""
    conn = sqlite3.connect(path)
    try:
        count: int = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    finally:
        conn.close()
    return count


def _ms(values: Sequence[float], p: float) -> str:
    return f"{percentile(sorted(values), p) * 1e3:,.1f}" if values else ""


def _cells(client: Client, msmtp: Client | None, target: bool) -> list[str]:
    ratio = (percentile(sorted(client.walls), 50) / percentile(sorted(msmtp.walls), 50)
             if msmtp is not None and client.walls and msmtp.walls else None)
    return [client.name, str(len(client.walls)), _ms(client.walls, 50), _ms(client.walls, 95),
            f"{min(client.walls) * 1e3:,.1f}", f"{max(client.walls) * 1e3:,.1f}",
            f"{sum(client.cpus) / len(client.cpus) * 1e3:,.1f}", _ms(client.to_server, 50),
            "" if ratio is None else f"{ratio:.0%}",
            ("yes" if ratio <= TARGET else "NO") if target and ratio is not None else ""]


async def _run(runs: int, ssmtp_runs: int) -> None:
    import trustme

    msmtp_bin, ssmtp_bin = shutil.which("msmtp"), shutil.which("ssmtp") or "/usr/sbin/ssmtp"
    if msmtp_bin is None or not os.access(ssmtp_bin, os.X_OK):
        raise RuntimeError("msmtp and ssmtp are needed: run `make mail-clients` (scripts/ensure-mail-clients.sh)")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="opsrelay-bench-") as tmp:
        work = Path(tmp)
        server = await SmarthostChild.start(work / "smtp")
        relay = None
        try:
            other_ca = work / "other-ca.pem"
            trustme.CA().cert_pem.write_to_path(str(other_ca))
            paths = _write_configs(work, server, other_ca, unique_prefix("sendmail"))
            # Our own cache and state folders: the config cache is part of the measured path, not the user's.
            folders = {"XDG_CACHE_HOME": str(work / "cache"), "XDG_STATE_HOME": str(work / "state")}
            ops_env = deployed_env(OPSRELAY_CONFIG=str(paths["opsrelay"]), **folders)
            alone_env = deployed_env(OPSRELAY_CONFIG=str(paths["opsrelay-alone"]), **folders)
            floor = Client("python -c pass (interpreter floor)", [str(VENV_BIN / "python"), "-c", "pass"],
                           deployed_env(), delivers=False)
            ops = Client("opsrelay-sendmail -t -i (queue, sqlite)", [str(VENV_BIN / "opsrelay-sendmail"), "-t", "-i"],
                         ops_env)
            alone = Client("opsrelay-sendmail, no relay running", ops.argv, alone_env, delivers=False)
            msmtp = Client("msmtp -t -i", [msmtp_bin, "-C", str(paths["msmtp"]), "-t", "-i"], child_env())
            ssmtp = Client("ssmtp -t -i", [ssmtp_bin, "-C", str(paths["ssmtp"]), "-t", "-i"], child_env())
            await server.mark("clean")
            relay = await _relay(paths["opsrelay"], work / "relay.log")
            bench = Bench(server, work)
            # Warm-up, not counted: page cache, config cache; the first write to a new queue file makes its schema.
            for client in (floor, ops, ops, alone, alone, msmtp, ssmtp):
                await bench.once(client, record=False)
            turn = [floor, ops, alone, msmtp]
            ssmtp_at = {round(i * runs / ssmtp_runs) for i in range(ssmtp_runs)} if ssmtp_runs else set()
            began = time.monotonic()
            for i in range(runs):
                shift = i % len(turn)
                for client in turn[shift:] + turn[:shift]:
                    await bench.once(client, record=True)
                if i in ssmtp_at:
                    await bench.once(ssmtp, record=True)
            measured = time.monotonic() - began
            msmtp_check = await bench.delivers_with_untrusted_ca(
                [msmtp_bin, "-C", str(paths["msmtp-untrusted"]), "-t", "-i"], child_env())
            ssmtp_check = await bench.delivers_with_untrusted_ca(
                [ssmtp_bin, "-C", str(paths["ssmtp-untrusted"]), "-t", "-i"], child_env())
            queued = _queued(work / "opsrelay-alone.db")
        finally:
            if relay is not None and relay.returncode is None:
                relay.terminate()
                try:
                    await asyncio.wait_for(relay.wait(), 30)
                except TimeoutError:
                    relay.kill()
                    await relay.wait()
            await server.stop()
    load_after = os.getloadavg()[0]

    def verdict(check: tuple[int, bool]) -> str:
        code, arrived = check
        return f"exit {code}, mail {'DELIVERED' if arrived else 'not delivered'}"

    if queued != len(alone.walls) + 2:
        raise RuntimeError(f"the queue without a relay holds {queued} mails, expected {len(alone.walls) + 2}")
    rows = [_cells(floor, None, False), _cells(ops, msmtp, True), _cells(alone, msmtp, True),
            _cells(msmtp, None, False)]
    if ssmtp.walls:
        rows.append(_cells(ssmtp, msmtp, False))
    print_table(
        f"Sendmail: submission latency, whole process, in ms ({len(message(1)):,}-byte message, -t -i, "
        "STARTTLS + AUTH server on 127.0.0.1)",
        ["submission", "runs", "p50", "p95", "min", "max", "CPU ms", "to server p50", "vs msmtp p50",
         f"<= {TARGET:.0%}"],
        rows,
        notes=[
            "wall: from spawn until the process exited (subprocess.run, stdin from a file); CPU: the child's "
            "user + system time. p50/p95 are nearest-rank percentiles. Python children run without "
            "PYTHONDONTWRITEBYTECODE, with compiled bytecode as installed.",
            "opsrelay-sendmail is the virtualenv's console script in queue mode (OPSRELAY_CONFIG, broker.url "
            "sqlite:///<tmp>/opsrelay.db): it writes the mail to the queue with synchronous=FULL and pokes "
            "`opsrelay serve`, which runs beside it and delivers; its 'to server' includes that delivery. "
            f"'no relay running': the same on a second queue file nobody consumes (checked afterwards: it holds "
            f"all {queued} mails), i.e. without the relay's delivery competing for the CPU.",
            "msmtp and ssmtp connect, STARTTLS, AUTH and deliver themselves; 'to server' is from spawn until the "
            "server took the mail. ssmtp sleeps 1 s at the end of its input before it ends the DATA, so it ran "
            f"only {len(ssmtp.walls)} time(s), spread over the run.",
            f"one mail per run, each checked to arrive over TLS after AUTH before the next run; {runs} rounds, the "
            "clients taking turns (each round starting with the next), after one warm-up run each (two for "
            "each opsrelay queue file) that is not counted.",
            f"certificate check, with a CA that did not sign the server's certificate: msmtp {verdict(msmtp_check)}; "
            f"ssmtp (TLS_CA_File) {verdict(ssmtp_check)}.",
            f"measured rounds took {measured:.0f}s; 1-minute load average {load_before:.1f} before, "
            f"{load_after:.1f} after, on {os.cpu_count()} CPUs (anything above ~2 means other work shared the "
            "machine).",
        ],
    )


def run(runs: int = 40, ssmtp_runs: int = 5) -> None:
    """``runs`` submissions each for opsrelay-sendmail, msmtp and the interpreter floor; ``ssmtp_runs`` for ssmtp."""
    asyncio.run(_run(runs, min(ssmtp_runs, runs)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sendmail_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sendmail-runs", type=int, default=40,
                        help="submissions each for opsrelay-sendmail, msmtp and python -c pass (40)")
    parser.add_argument("--ssmtp-runs", type=int, default=5, help="submissions for ssmtp, ~1.1 s each (5)")
    args = parser.parse_args(argv)
    if args.sendmail_runs < 1 or args.ssmtp_runs < 0:
        parser.error("--sendmail-runs must be at least 1 and --ssmtp-runs at least 0")
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    run(args.sendmail_runs, args.ssmtp_runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
