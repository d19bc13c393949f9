"""Mails per second with SASL XOAUTH2 against password AUTH, into the same smarthost, in the same run.

XOAUTH2 costs a token fetch and a longer AUTH line per *session*; once a connection is reused it
should cost nothing per mail. This measures that, and counts the token fetches, which must stay
at one per token lifetime (here: one per run of a row), never one per mail.

The smarthost is ``tests.oauth_servers.XOAuth2SmtpServer`` (aiosmtpd, trustme certificate,
STARTTLS required, AUTH PLAIN/LOGIN and XOAUTH2 only over TLS) with its ``TokenEndpoint``
(client_credentials grant, tokens valid an hour), both in a process of their own so that they
never share a GIL with the client. That process stamps each mail with ``time.monotonic()``,
checks it came over TLS after AUTH, and counts token fetches and AUTHs of each kind.

Rows, each with password AUTH and with XOAUTH2 (the same ~1.5 KB rendered crash mails):

* bare aiosmtplib loop: one connection, ``login`` or ``auth_xoauth2`` once, then ``sendmail``
  per mail (its token fetched with httpx first): the library's ceiling;
* ``Smarthosts`` (the relay's Mailer: ``SmtpPool`` with the ``[smtp.oauth2]`` token source),
  pool_size=1 and 2, as the relay drives it without a queue;
* the relay: ``serve_forever`` with ``Smarthosts`` in this process, on the embedded sqlite engine,
  draining a pre-filled outbound queue (consume, send, ack), pool_size=1 and 2.

mails/s is (N-1) / (last - first mail taken by the server); rows run in interleaved rounds and
each shows its fastest round. ``XOAUTH2/password`` is the XOAUTH2 row's mails/s over the password
row's of the same kind and pool size; ``>= 90%`` says whether it is within 90% of it.

``python -m bench.xoauth2_throughput [--mails N] [--rounds R]``; ``... smtp-server DIR`` is the server process.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO, child_env, print_table, tail, unique_prefix
from bench.relay_throughput import HELO, RECIPIENT, SENDER, SmtpChild, Window, crash_mails
from relay.contract.mail import OutboundMail
from tests.oauth_servers import CLIENT_ID, CLIENT_SECRET, SCOPE
from tests.smtp_server import DEFAULT_PASSWORD, DEFAULT_USER

__all__ = ["main", "run", "serve_smtp"]

TARGET = 0.90
TOKEN_LIFETIME = 3600.0


# -- the smarthost and its token endpoint, in their own process -----------------------------------

def serve_smtp(state_dir: str) -> int:
    """``ready PORT CA TOKEN_URL``, then ``mark``, ``wait N TIMEOUT`` (as bench.relay_throughput) and
    ``auth`` (token fetches, XOAUTH2 AUTHs, password AUTHs since the mark) on stdin."""
    import re

    from tests.oauth_servers import TokenEndpoint, XOAuth2SmtpServer
    from tests.smtp_server import ReceivedMail

    logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd warns on every AUTH
    message_id = re.compile(rb"^Message-ID:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)
    took = threading.Condition()
    stamps: list[float] = []
    seen: set[bytes] = set()
    insecure = duplicates = 0
    cpu_mark = time.process_time()
    marks = (0, 0, 0)

    def on_receive(mail: ReceivedMail) -> None:
        nonlocal insecure, duplicates
        found = message_id.search(mail.content)
        key = found.group(1) if found else mail.content
        with took:
            if key in seen:
                duplicates += 1
                return
            seen.add(key)
            stamps.append(time.monotonic())
            insecure += not (mail.tls and mail.auth_user == DEFAULT_USER)
            took.notify_all()

    with TokenEndpoint(lifetime=TOKEN_LIFETIME) as endpoint, \
            XOAuth2SmtpServer(state_dir, endpoint, password_auth=True, on_receive=on_receive) as server:

        def counts() -> tuple[int, int, int]:
            attempts = [a for a in server.auth_attempts if a.success]
            return (endpoint.granted("client_credentials"), sum(a.mechanism == "XOAUTH2" for a in attempts),
                    sum(a.mechanism != "XOAUTH2" for a in attempts))

        print(f"ready {server.port} {server.ca_pem_path} {endpoint.url}", flush=True)
        for line in sys.stdin:
            command, *args = line.split()
            with took:
                if command == "mark":
                    stamps.clear()
                    seen.clear()
                    insecure = duplicates = 0
                    cpu_mark = time.process_time()
                    marks = counts()
                    print("ok", flush=True)
                elif command == "wait":
                    want = int(args[0])
                    took.wait_for(functools.partial(_at_least, stamps, want), timeout=float(args[1]))
                    last = stamps[want - 1] if len(stamps) >= want else 0.0
                    print(f"{len(stamps)} {insecure} {stamps[0] if stamps else 0.0} {last} "
                          f"{time.process_time() - cpu_mark} {duplicates}", flush=True)
                elif command == "auth":
                    print(" ".join(str(now - then) for now, then in zip(counts(), marks, strict=True)), flush=True)
    return 0


def _at_least(stamps: list[float], want: int) -> bool:
    return len(stamps) >= want


@dataclass(frozen=True)
class AuthCounts:
    fetches: int
    xoauth2: int
    password: int


class OAuthChild(SmtpChild):
    """bench.relay_throughput's server child, with a token endpoint and AUTH counters."""

    token_url = ""

    @classmethod
    async def start(cls, state_dir: Path) -> OAuthChild:
        log = state_dir.with_name(state_dir.name + ".log")
        with log.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.xoauth2_throughput", "smtp-server", str(state_dir),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr, cwd=REPO,
                env=child_env())
        assert proc.stdout is not None
        ready = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()
        if len(ready) != 4 or ready[0] != "ready":
            proc.kill()
            raise RuntimeError(f"the SMTP server process did not start: {ready!r}\n{tail(log)}")
        child = cls(proc, int(ready[1]), Path(ready[2]))
        child.token_url = ready[3]
        return child

    async def auth(self) -> AuthCounts:
        fetches, xoauth2, password = (await self._ask("auth")).split()
        return AuthCounts(int(fetches), int(xoauth2), int(password))

    def settings(self, pool_size: int, xoauth2: bool) -> dict[str, object]:
        """``[smtp]`` for this server: the password, or ``[smtp.oauth2]`` with the client_credentials grant."""
        smtp = self.smtp_config(pool_size)
        if xoauth2:
            del smtp["password"]
            smtp["oauth2"] = {"grant": "client_credentials", "token_url": self.token_url, "client_id": CLIENT_ID,
                              "client_secret": CLIENT_SECRET, "scope": SCOPE}
        return smtp


# -- the clients ------------------------------------------------------------------------------------

async def fetch_token(server: OAuthChild) -> str:
    import httpx

    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(server.token_url, data={
            "grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
            "scope": SCOPE})
    response.raise_for_status()
    token: str = response.json()["access_token"]
    return token


async def bare_loop(server: OAuthChild, raws: Sequence[bytes], xoauth2: bool) -> None:
    """One aiosmtplib connection, AUTH once, sendmail per mail: the library's own ceiling."""
    import aiosmtplib

    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, start_tls=True,
                             tls_context=server.tls_context(), local_hostname=HELO, timeout=30)
    await client.connect()
    if xoauth2:
        await client.auth_xoauth2(DEFAULT_USER, await fetch_token(server))
    else:
        await client.login(DEFAULT_USER, DEFAULT_PASSWORD)
    for raw in raws:
        refused, reply = await client.sendmail(SENDER, [RECIPIENT], raw)
        if refused or not reply.startswith("2"):
            raise RuntimeError(f"bare loop: mail not taken: {refused} {reply}")
    await client.quit()


async def smarthosts(server: OAuthChild, raws: Sequence[bytes], pool_size: int, xoauth2: bool) -> None:
    """The relay's Mailer with pool_size deliveries in flight, as the relay drives it."""
    from relay.config.models import SmtpConfig
    from relay.delivery.smarthosts import Smarthosts

    mailer = Smarthosts(SmtpConfig.model_validate(server.settings(pool_size, xoauth2)))

    async def one(share: Sequence[bytes]) -> None:
        for raw in share:
            result = await mailer.send(SENDER, [RECIPIENT], raw)
            if result.refused or not result.accepted:
                raise RuntimeError(f"Smarthosts: mail not taken: {result}")

    try:
        await asyncio.gather(*(one(raws[i::pool_size]) for i in range(pool_size)))
    finally:
        await mailer.close()


async def relay(server: OAuthChild, mails: Sequence[OutboundMail], pool_size: int, xoauth2: bool,
                work: Path) -> Row:
    """``serve_forever`` with Smarthosts on a fresh sqlite queue pre-filled with ``mails``, until all arrived."""
    from relay.config.models import Config
    from relay.contract.mail import to_message
    from relay.contract.names import dead_queue, outbound_queue
    from relay.daemon.relay import relay_topology
    from relay.daemon.serve import serve_forever
    from relay.delivery.smarthosts import Smarthosts
    from relay.engines import open_engine

    prefix = unique_prefix(f"x{pool_size}")
    config = Config.model_validate({
        "host": "bench", "broker": {"url": f"sqlite:///{work / (prefix + '.db')}", "prefix": prefix},
        "smtp": server.settings(pool_size, xoauth2)})
    engine = open_engine(config.broker.url)
    await engine.connect()
    try:
        await engine.declare(relay_topology(config))
        for start in range(0, len(mails), 200):
            await asyncio.gather(*(engine.send(outbound_queue(prefix), to_message(m))
                                   for m in mails[start:start + 200]))
        await server.mark()
        started, cpu = time.monotonic(), time.process_time()
        stop = asyncio.Event()
        mailer = Smarthosts(config.smtp)
        task = asyncio.create_task(serve_forever(config, mailer, stop))
        try:
            window = await server.wait(len(mails))
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await mailer.close()
        cpu = time.process_time() - cpu
        left = await engine.depth(outbound_queue(prefix)) + await engine.depth(dead_queue(prefix))
    finally:
        await engine.close()
    name = f"relay, sqlite, pool_size={pool_size}"
    _check(name, window, len(mails))
    if left:
        raise RuntimeError(f"{name}: {left} messages left on outbound or dead-lettered")
    return Row(name, _auth(xoauth2), pool_size, len(mails), started, window, cpu / len(mails), await server.auth())


# -- measuring and reporting -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    name: str
    auth: str
    connections: int
    mails: int
    started: float
    window: Window
    client_cpu: float  # CPU seconds per mail of this process
    counts: AuthCounts

    @property
    def rate(self) -> float:
        return (self.mails - 1) / (self.window.last - self.window.first)


def _auth(xoauth2: bool) -> str:
    return "XOAUTH2" if xoauth2 else "password"


def _check(name: str, window: Window, count: int) -> None:
    if window.received != count or window.insecure:
        raise RuntimeError(f"{name}: the server took {window.received} mails of {count}, "
                           f"{window.insecure} without TLS+AUTH")


async def measure(server: OAuthChild, name: str, xoauth2: bool, connections: int, count: int,
                  client: Callable[[], Awaitable[None]]) -> Row:
    await server.mark()
    started, cpu = time.monotonic(), time.process_time()
    await client()
    cpu = time.process_time() - cpu
    window = await server.wait(count)
    _check(name, window, count)
    return Row(name, _auth(xoauth2), connections, count, started, window, cpu / count, await server.auth())


def _cells(rounds: list[Row], password: list[Row] | None) -> list[str]:
    best, worst = max(rounds, key=lambda r: r.rate), min(rounds, key=lambda r: r.rate)
    ratio = best.rate / max(r.rate for r in password) if password is not None else None
    fetches = max(r.counts.fetches for r in rounds)
    sessions = min(r.counts.xoauth2 + r.counts.password for r in rounds)
    per_session = "" if best.auth == "password" else ("yes" if fetches <= 1 <= sessions else "NO")
    return [best.name, best.auth, str(best.connections), f"{len(rounds)}x{best.mails:,}", f"{best.rate:,.0f}",
            f"{worst.rate:,.0f}", "" if ratio is None else f"{ratio:.0%}",
            "" if ratio is None else ("yes" if ratio >= TARGET else "NO"),
            str(fetches), str(max(r.counts.xoauth2 + r.counts.password for r in rounds)), per_session,
            f"{best.client_cpu * 1e3:.2f}", f"{best.window.server_cpu / best.mails * 1e3:.2f}"]


async def _run(count: int, rounds: int) -> None:
    mails = crash_mails(count)
    raws = [m.raw for m in mails]
    rows: dict[tuple[str, bool], list[Row]] = defaultdict(list)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="opsrelay-bench-xoauth2-") as tmp:
        work = Path(tmp)
        server = await OAuthChild.start(work / "smtp")
        try:
            await bare_loop(server, raws[:20], False)  # warm-up: imports, first handshake; not measured
            await bare_loop(server, raws[:20], True)
            # Each password row next to its XOAUTH2 row, so that the two compared share the machine's mood.
            plan: list[tuple[tuple[str, bool], Callable[[], Awaitable[Row]]]] = []
            for xoauth2 in (False, True):
                plan.append((("bare", xoauth2), functools.partial(
                    measure, server, "bare aiosmtplib loop", xoauth2, 1, count,
                    functools.partial(bare_loop, server, raws, xoauth2))))
            for n in (1, 2):
                for xoauth2 in (False, True):
                    plan.append(((f"mailer{n}", xoauth2), functools.partial(
                        measure, server, f"Smarthosts, pool_size={n}", xoauth2, n, count,
                        functools.partial(smarthosts, server, raws, n, xoauth2))))
            for n in (1, 2):
                for xoauth2 in (False, True):
                    plan.append(((f"relay{n}", xoauth2), functools.partial(relay, server, mails, n, xoauth2, work)))
            # Interleaved rounds, each starting one row later: load from elsewhere falls on every row alike.
            for turn in range(rounds):
                shift = turn % len(plan)
                for key, step in plan[shift:] + plan[:shift]:
                    rows[key].append(await step())
        finally:
            await server.stop()
    load_after = os.getloadavg()[0]

    table = []
    for kind in ("bare", "mailer1", "mailer2", "relay1", "relay2"):
        table += [_cells(rows[(kind, False)], None), _cells(rows[(kind, True)], rows[(kind, False)])]
    size = sum(len(r) for r in raws) / len(raws)
    print_table(
        f"XOAUTH2 against password AUTH: mails/s on reused connections ({size:,.0f}-byte crash mails)",
        ["row", "auth", "conns", "mails", "mails/s", "worst", "XOAUTH2/password", f">= {TARGET:.0%}",
         "token fetches", "AUTHs", "1 fetch/lifetime", "CPU ms/mail: client", "server"],
        table,
        notes=[
            "server: tests.oauth_servers.XOAuth2SmtpServer and its TokenEndpoint (client_credentials, tokens "
            f"valid {TOKEN_LIFETIME:g}s) in their own process; every mail was checked to arrive over TLS after AUTH.",
            f"each row ran {rounds} rounds of {count:,} mails, interleaved (each round starting one row later); "
            "figures are its fastest round, 'worst' the slowest round's mails/s.",
            "mails/s: (N-1) / (last - first mail taken by the server). XOAUTH2/password: against the password "
            "row of the same kind and pool size.",
            "token fetches and AUTHs: the most in one round of the row, counted by the server process. "
            "1 fetch/lifetime: one token fetch served every session of the round (not one per mail or session).",
            "relay rows: serve_forever with Smarthosts in this process on the embedded sqlite engine, draining "
            "a pre-filled outbound queue; its INFO log lines have no handler (dropped), unlike `python -m bench "
            "relay` (d), which logs to a file.",
            f"1-minute load average {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs.",
        ],
    )


def run(mails: int = 1000, rounds: int = 3) -> None:
    asyncio.run(_run(mails, rounds))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.xoauth2_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mails", type=int, default=1000, help="mails per row and round (1000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row (3)")
    args = parser.parse_args(argv)
    if args.mails < 2 or args.rounds < 1:
        parser.error("--mails must be at least 2 and --rounds at least 1")
    run(args.mails, args.rounds)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["smtp-server"] and len(sys.argv) == 3:
        sys.exit(serve_smtp(sys.argv[2]))
    sys.exit(main())
