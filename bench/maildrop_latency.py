"""Submission latency of an unprivileged user through the maildrop, against msmtp as that user.

Each row is the whole-process wall time of one submission by ``opsrelay-t1`` (a user of
scripts/ensure-test-users.sh), from spawn to exit: the ~2 KB report of
:func:`bench.sendmail_latency.message` on stdin, ``-t -i``. The server is
:class:`bench.retry_load.SmarthostChild` (aiosmtpd in its own process, STARTTLS required, AUTH
only over TLS), which checks that each mail came over TLS after AUTH.

* ``opsrelay-sendmail (maildrop)``: ``python -m relay.sendmail`` as the user. The relay's config
  is root's, mode 0600, so the user cannot read it: the submission is written to the maildrop
  (``$OPSRELAY_SENDMAIL__MAILDROP``; 0600 file, fsync, rename, folder fsync) and the relay's
  ``.wake`` socket poked; ``opsrelay serve`` (root) runs beside it, ingests the file into its
  sqlite queue and delivers. The bench waits for the server to take each mail.
  The interpreter is the first of the virtualenv's and the system's ``python3.X`` (same version)
  the user can run: the virtualenv's often links into /root, which other users cannot enter.
* ``... no relay running``: the same into a second maildrop nobody ingests (counted afterwards),
  i.e. without the relay's ingest and delivery competing for the CPU.
* ``msmtp -t -i``: connects, STARTTLS, AUTH and delivers itself, with a config file of the user's
  own (0600, as msmtp requires of a file holding a password).
* ``opsrelay-sendmail as root (queue)``: root's submission straight into the queue, for reference.
* ``setpriv`` / ``runuser`` with ``/bin/true``, and ``python -c pass`` as the user: what changing
  user and starting the interpreter cost alone. The user's submissions run under ``setpriv``
  (``--reuid --regid --init-groups``: one exec, no PAM session), msmtp's too, so the ratio compares
  like with like; the notes also give each p50 net of setpriv's.

Clients take turns run by run, each run waiting until the server has its mail. Needs root and
the user: ``sudo scripts/ensure-test-users.sh`` first. ``python -m bench.maildrop_latency``.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import logging
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import REPO, percentile, print_table, tail, unique_prefix
from bench.retry_load import SmarthostChild, deployed_env
from bench.sendmail_latency import RECIPIENT, Bench, Client, message

__all__ = ["run"]

VENV_BIN = Path(sys.executable).parent  # the virtualenv running the bench (opsrelay, opsrelay-sendmail)
USER = "opsrelay-t1"
TARGET = 0.5  # the user's submission at most half of msmtp's
USER_PATH = "/usr/local/bin:/usr/bin:/bin"


def _user_python(user: pwd.struct_passwd) -> str:
    """An interpreter of our version that ``user`` can run with this checkout importable.

    Probed with runuser, not setpriv: as root, setpriv here starts a program under /root (0700)
    that the user cannot even stat, and the virtualenv's python then runs on the system's
    libpython and standard library; that is not an interpreter the user has.
    """
    wanted = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, *(shutil.which(f"python{wanted}", path=p) for p in ("/usr/bin", "/usr/local/bin"))]
    probe = "import sys, relay.sendmail.main; print('%d.%d' % sys.version_info[:2])"
    for candidate in dict.fromkeys(c for c in candidates if c):
        done = subprocess.run(["runuser", "-u", user.pw_name, "--", "env", "-i", f"PATH={USER_PATH}",
                               f"PYTHONPATH={REPO}", candidate, "-c", probe], capture_output=True, text=True, cwd="/",
                              check=False, timeout=30)
        if done.returncode == 0 and done.stdout.strip() == wanted:
            return candidate
    raise RuntimeError(f"no python{wanted} that {user.pw_name} can run with {REPO} importable")


def _workdir() -> Path:
    """A fresh folder in /tmp the user can traverse: to the maildrops, the server's CA (msmtp) and its config."""
    work = Path(tempfile.mkdtemp(prefix="opsrelay-bench-md-", dir="/tmp"))
    work.chmod(0o755)
    return work


def _layout(work: Path, name: str, server: SmarthostChild, prefix: str) -> tuple[Path, Path]:
    """A root-only config (0600) with its own sqlite queue and maildrop; (config, maildrop)."""
    from relay.maildrop.ingest import ensure_layout

    maildrop = work / name / "spool" / "maildrop"
    (work / name).mkdir(mode=0o755)
    ensure_layout(str(maildrop))
    config = work / name / "opsrelay.toml"
    smtp = server.smtp_config(pool_size=1)
    config.write_text(
        f'host = "web1"\n\n[broker]\nurl = {json.dumps(f"sqlite:///{work / name}/state/queue.db")}\n'
        f'prefix = "{prefix}"\n\n[sendmail]\nmaildrop = {json.dumps(str(maildrop))}\ndomain = "example.com"\n\n'
        "[smtp]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in smtp.items()), encoding="utf-8")
    config.chmod(0o600)
    return config, maildrop


def _ingesting(log: Path, wake: Path) -> bool:
    return b"relay: consuming" in log.read_bytes() and wake.is_socket()


async def _relay(config: Path, log: Path, wake: Path) -> asyncio.subprocess.Process:
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "opsrelay"), "serve", "--config", str(config), stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr, cwd=REPO, env=deployed_env(PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + 30
    while not _ingesting(log, wake):
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"opsrelay serve did not start ingesting:\n{tail(log)}")
        await asyncio.sleep(0.05)
    return proc


def _p50(client: Client) -> float:
    return percentile(sorted(client.walls), 50)


def _ms(values: Sequence[float], p: float) -> str:
    return f"{percentile(sorted(values), p) * 1e3:,.1f}" if values else ""


def _row(client: Client, msmtp: Client | None) -> list[str]:
    ratio = _p50(client) / _p50(msmtp) if msmtp is not None else None
    return [client.name, str(len(client.walls)), _ms(client.walls, 50), _ms(client.walls, 95),
            f"{min(client.walls) * 1e3:,.1f}", f"{max(client.walls) * 1e3:,.1f}",
            f"{sum(client.cpus) / len(client.cpus) * 1e3:,.1f}", _ms(client.to_server, 50),
            "" if ratio is None else f"{ratio:.0%}", "" if ratio is None else ("yes" if ratio <= TARGET else "NO")]


async def _run(runs: int) -> None:
    if os.geteuid() != 0:
        raise RuntimeError("the maildrop bench runs as root (it submits as another user and runs the relay as root)")
    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        raise RuntimeError(f"user {USER} is missing: run scripts/ensure-test-users.sh") from None
    msmtp_bin, setpriv, runuser = shutil.which("msmtp"), shutil.which("setpriv"), shutil.which("runuser")
    if msmtp_bin is None or setpriv is None or runuser is None:
        raise RuntimeError("msmtp, setpriv and runuser are needed (make mail-clients; util-linux)")
    python = _user_python(user)
    # As pip does on install: the user cannot write __pycache__ in this checkout, so compile it here.
    compileall.compile_dir(str(REPO / "relay"), quiet=1)
    as_user = [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]
    load_before = os.getloadavg()[0]
    work = _workdir()
    relay = None
    server = None
    try:
        server = await SmarthostChild.start(work / "smtp")
        prefix = unique_prefix("maildrop")
        config, maildrop = _layout(work, "host", server, prefix)
        alone_config, alone_maildrop = _layout(work, "alone", server, prefix)
        msmtprc = work / "msmtprc"
        msmtprc.write_text("\n".join([
            "account bench", "host 127.0.0.1", f"port {server.port}", "tls on", "tls_starttls on",
            f"tls_trust_file {server.ca}", "auth on", f"user {server.smtp_config(1)['username']}",
            f"password {server.smtp_config(1)['password']}", f"from {user.pw_name}@example.com",
            "domain client.test", "account default : bench", ""]), encoding="utf-8")
        msmtprc.chmod(0o600)
        os.chown(msmtprc, user.pw_uid, user.pw_gid)  # msmtp wants a config with a password to be the user's own

        def user_env(config_path: Path, folder: Path) -> dict[str, str]:
            return {"PATH": USER_PATH, "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name,
                    "LC_ALL": "C.UTF-8", "PYTHONPATH": str(REPO), "OPSRELAY_CONFIG": str(config_path),
                    "OPSRELAY_SENDMAIL__MAILDROP": str(folder)}

        sendmail = [python, "-m", "relay.sendmail", "-t", "-i"]
        plain = {"PATH": USER_PATH, "HOME": user.pw_dir, "LC_ALL": "C.UTF-8"}
        setpriv_row = Client("setpriv -- /bin/true (changing user alone)", [*as_user, "/bin/true"], plain,
                             delivers=False)
        runuser_row = Client("runuser -u -- /bin/true (the same via PAM)", [runuser, "-u", USER, "--", "/bin/true"],
                             plain, delivers=False)
        floor = Client("python -c pass as the user (interpreter floor)", [*as_user, python, "-c", "pass"],
                       {**plain, "PYTHONPATH": str(REPO)}, delivers=False)
        ops = Client("opsrelay-sendmail -t -i as the user (maildrop)", [*as_user, *sendmail],
                     user_env(config, maildrop))
        alone = Client("  the same, no relay running", [*as_user, *sendmail], user_env(alone_config, alone_maildrop),
                       delivers=False)
        msmtp = Client("msmtp -t -i as the user", [*as_user, msmtp_bin, "-C", str(msmtprc), "-t", "-i"], plain)
        root_queue = Client("opsrelay-sendmail -t -i as root (queue)", [str(VENV_BIN / "opsrelay-sendmail"), "-t",
                                                                         "-i"],
                            deployed_env(PYTHONPATH=str(REPO), OPSRELAY_CONFIG=str(config),
                                         XDG_CACHE_HOME=str(work / "cache")))
        await server.mark("clean")
        relay = await _relay(config, work / "relay.log", maildrop / ".wake")
        bench = Bench(server, work)
        for client in (setpriv_row, runuser_row, floor, ops, ops, alone, alone, msmtp, root_queue, root_queue):
            await bench.once(client, record=False)  # warm-up: page cache, the queue file's schema
        turn = [setpriv_row, runuser_row, floor, ops, alone, msmtp, root_queue]
        began = time.monotonic()
        for i in range(runs):
            shift = i % len(turn)
            for client in turn[shift:] + turn[:shift]:
                await bench.once(client, record=True)
        measured = time.monotonic() - began
        waiting = [n for n in os.listdir(alone_maildrop) if not n.startswith(".")]
        left = [n for n in os.listdir(maildrop) if not n.startswith(".")]
        owners = {os.lstat(alone_maildrop / n).st_uid for n in waiting}
    finally:
        if relay is not None and relay.returncode is None:
            relay.terminate()
            try:
                await asyncio.wait_for(relay.wait(), 30)
            except TimeoutError:
                relay.kill()
                await relay.wait()
        if server is not None:
            await server.stop()
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()[0]
    if len(waiting) != len(alone.walls) + 2 or owners != {user.pw_uid} or left:
        raise RuntimeError(f"the maildrop nobody ingests holds {len(waiting)} files (expected "
                           f"{len(alone.walls) + 2}, all {USER}'s: {owners}); the relay's holds {len(left)}")
    overhead = _p50(setpriv_row)
    rows = [_row(c, None) for c in (setpriv_row, runuser_row, floor)] + [_row(c, msmtp) for c in (ops, alone)]
    rows += [_row(msmtp, None), _row(root_queue, msmtp)]
    print_table(
        f"Maildrop: submission latency of the unprivileged user {USER}, whole process, in ms "
        f"({len(message(1)):,}-byte message, -t -i, STARTTLS + AUTH server on 127.0.0.1)",
        ["submission", "runs", "p50", "p95", "min", "max", "CPU ms", "to server p50", "vs msmtp p50",
         f"<= {TARGET:.0%}"],
        rows,
        notes=[
            "wall: from spawn until the process exited (stdin from a file); CPU: the child's user + system time; "
            "nearest-rank percentiles. Rows 'as the user' run under setpriv (--reuid/--regid/--init-groups), "
            "msmtp's too; the setpriv row is that cost alone, and runuser's (a PAM session) is shown beside it.",
            f"net of setpriv's p50 ({overhead * 1e3:.1f} ms): opsrelay-sendmail (maildrop) "
            f"{(_p50(ops) - overhead) * 1e3:.1f} ms, msmtp {(_p50(msmtp) - overhead) * 1e3:.1f} ms, ratio "
            f"{(_p50(ops) - overhead) / (_p50(msmtp) - overhead):.0%}.",
            f"the user's interpreter: {python} (Python {sys.version_info.major}.{sys.version_info.minor}, "
            f"{REPO} on PYTHONPATH, compiled beforehand by root as an install would be). The config is root's "
            "0600, so the submission goes to the maildrop; 'to server' includes the relay's ingest (woken "
            "through .wake), its sqlite queue and the delivery.",
            f"'no relay running': a second maildrop nobody ingests; afterwards it held all {len(waiting)} files "
            f"({len(alone.walls)} runs + 2 warm-ups), each {USER}'s, and the relay's maildrop was empty.",
            f"recipient {RECIPIENT}; each run checked to reach the server over TLS after AUTH before the next; "
            f"{runs} rounds, the clients taking turns, after one warm-up each (two per maildrop) not counted.",
            f"measured rounds took {measured:.0f}s; 1-minute load average {load_before:.1f} before, "
            f"{load_after:.1f} after, on {os.cpu_count()} CPUs.",
        ],
    )


def run(runs: int = 40) -> None:
    """``runs`` submissions for each row."""
    asyncio.run(_run(runs))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.maildrop_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40, help="submissions for each row (40)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    run(args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
