"""relay.delivery.smtp against a real SMTP server (aiosmtpd, trustme TLS, AUTH) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from relay.config.models import SmtpConfig
from relay.delivery.outcome import Reply, SendResult
from relay.delivery.smtp import SmtpPool, translate_error
from relay.errors import (
    RelayError,
    SMTPConnectError,
    SMTPPermanentError,
    SMTPSecurityError,
    SMTPTemporaryError,
    SMTPTimeoutError,
)
from tests.smtp_server import DEFAULT_PASSWORD, SmtpServer, TlsMode, free_port

pytestmark = pytest.mark.timeout(30)

SENDER = "alerts@example.test"
# CRLF line ends, 8-bit UTF-8 and a line starting with a dot (RFC 5321 §4.5.2 transparency).
RAW = ("From: alerts@example.test\r\nTo: ops@example.test\r\nSubject: worker_03 FATAL\r\n"
       "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
       "Prozess gestoppt: Größe ≠ 0\r\n.leading dot\r\n..two dots\r\n").encode()

ServerFactory = Callable[..., SmtpServer]
PoolFactory = Callable[..., SmtpPool]


@pytest.fixture(autouse=True)
def no_leaked_sockets() -> Iterator[None]:
    # A socket left open warns when collected; collect now so the test that leaked it fails.
    yield
    gc.collect()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[ServerFactory]:
    servers: list[SmtpServer] = []

    def make(**options: Any) -> SmtpServer:
        server = SmtpServer(tmp_path / f"smtp{len(servers)}", **options).start()
        servers.append(server)
        return server

    yield make
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def server(make_server: ServerFactory) -> SmtpServer:
    return make_server()


@pytest.fixture
async def make_pool(make_server: ServerFactory) -> AsyncIterator[PoolFactory]:
    # Depends on make_server so that pools close before their servers stop.
    pools: list[SmtpPool] = []

    def make(server: SmtpServer, **overrides: Any) -> SmtpPool:
        pool = SmtpPool(SmtpConfig.model_validate(server.client_settings(**overrides)))
        pools.append(pool)
        return pool

    yield make
    for pool in reversed(pools):
        await pool.close()


def auth_commands(server: SmtpServer) -> list[str]:
    return [cmd for conn in server.connections for cmd in conn.commands if cmd.startswith("AUTH")]


# -- the good path --------------------------------------------------------------------------


async def test_delivers_over_starttls_with_auth_and_keeps_the_bytes(server: SmtpServer,
                                                                     make_pool: PoolFactory) -> None:
    result = await make_pool(server).send(SENDER, ["ops@example.test"], RAW)

    assert result.accepted == ("ops@example.test",)
    assert result.refused == {}
    assert result.reply is not None and result.reply.code == 250
    [mail] = server.received
    assert mail.content == RAW
    assert (mail.mail_from, mail.rcpt_tos) == (SENDER, ("ops@example.test",))
    assert mail.tls is True
    assert mail.auth_user == server.user
    # RFC 3207 §4.2: EHLO again after STARTTLS; AUTH only then (the server offers it only over TLS).
    assert server.connections[0].commands[:4] == ["EHLO", "STARTTLS", "EHLO", "AUTH PLAIN"]


async def test_auth_login_when_the_server_offers_only_login(make_server: ServerFactory,
                                                            make_pool: PoolFactory) -> None:
    server = make_server(auth_mechanisms=("LOGIN",))
    await make_pool(server).send(SENDER, ["ops@example.test"], RAW)

    assert [(a.mechanism, a.success) for a in server.auth_attempts] == [("LOGIN", True)]
    assert server.received[0].auth_user == server.user


async def test_implicit_tls(make_server: ServerFactory, make_pool: PoolFactory) -> None:
    server = make_server(tls=TlsMode.IMPLICIT)
    await make_pool(server, security="tls").send(SENDER, ["ops@example.test"], RAW)

    [mail] = server.received
    assert (mail.tls, mail.auth_user, mail.content) == (True, server.user, RAW)
    assert "STARTTLS" not in server.connections[0].commands


async def test_clear_text_to_a_local_relay_without_auth(make_server: ServerFactory,
                                                        make_pool: PoolFactory) -> None:
    server = make_server(tls=TlsMode.NONE)
    await make_pool(server, security="none", username="", password=None).send(SENDER, ["a@x.test"], RAW)

    [mail] = server.received
    assert (mail.tls, mail.auth_user) == (False, None)
    assert auth_commands(server) == []


async def test_empty_username_sends_no_auth(make_server: ServerFactory, make_pool: PoolFactory) -> None:
    server = make_server(require_auth=False)
    await make_pool(server, username="", password=None).send(SENDER, ["a@x.test"], RAW)

    assert server.received[0].auth_user is None
    assert server.received[0].tls is True
    assert auth_commands(server) == []


async def test_check_does_everything_but_mail(server: SmtpServer, make_pool: PoolFactory) -> None:
    info = await make_pool(server).check()

    assert (info.tls, info.authenticated, info.port) == (True, True, server.port)
    assert "auth" in info.extensions
    assert server.connections[0].commands == ["EHLO", "STARTTLS", "EHLO", "AUTH PLAIN", "QUIT"]
    assert server.received == []


# -- connections ----------------------------------------------------------------------------


async def test_connection_is_reused_across_messages(server: SmtpServer, make_pool: PoolFactory) -> None:
    pool = make_pool(server)
    for n in range(5):
        await pool.send(SENDER, [f"ops{n}@example.test"], RAW)

    assert len(server.received) == 5
    assert len(server.connections) == 1
    assert len(server.auth_attempts) == 1


async def test_pool_bounds_concurrent_connections(server: SmtpServer, make_pool: PoolFactory) -> None:
    pool = make_pool(server, pool_size=2)
    results = await asyncio.gather(*(pool.send(SENDER, [f"ops{n}@example.test"], RAW) for n in range(8)))

    assert all(r.accepted for r in results)
    assert len(server.received) == 8
    assert server.max_concurrent <= 2
    assert len(server.connections) == 2  # both slots used, each connection reused


async def test_a_connection_the_server_closed_while_idle_is_replaced(
        server: SmtpServer, make_pool: PoolFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.delivery.smtp")
    pool = make_pool(server)
    await pool.send(SENDER, ["first@example.test"], RAW)
    server.drop_connections()  # blocks our loop: the client finds out only when it writes

    result = await pool.send(SENDER, ["second@example.test"], RAW)

    assert result.accepted == ("second@example.test",)
    assert [m.rcpt_tos for m in server.received] == [("first@example.test",), ("second@example.test",)]
    assert len(server.connections) == 2
    assert server.data_attempts == 2
    assert "idle connection was closed by the server" in caplog.text


async def test_data_is_never_replayed_after_the_server_may_have_taken_it(
        server: SmtpServer, make_pool: PoolFactory) -> None:
    pool = make_pool(server, timeout=0.3)
    await pool.send(SENDER, ["first@example.test"], RAW)  # a warm, reused connection
    server.reply_to_data("250 OK", delay=2.0)

    with pytest.raises(SMTPTimeoutError):
        await pool.send(SENDER, ["slow@example.test"], RAW)

    assert server.data_attempts == 2  # the slow DATA was sent once, not again on a new connection
    await pool.send(SENDER, ["next@example.test"], RAW)
    assert server.data_attempts == 3


async def test_server_down_is_a_connect_error(server: SmtpServer, make_pool: PoolFactory) -> None:
    with pytest.raises(SMTPConnectError):
        await make_pool(server, port=free_port()).send(SENDER, ["a@x.test"], RAW)


# -- TLS and AUTH fail closed ---------------------------------------------------------------


async def test_server_without_starttls_gets_neither_credentials_nor_mail(
        make_server: ServerFactory, make_pool: PoolFactory) -> None:
    # This server offers AUTH in clear and would take mail without it: the trap.
    server = make_server(tls=TlsMode.NONE)
    pool = make_pool(server, security="starttls")

    with pytest.raises(SMTPSecurityError, match="STARTTLS"):
        await pool.send(SENDER, ["ops@example.test"], RAW)
    with pytest.raises(SMTPSecurityError):
        await pool.check()

    assert server.received == []
    assert server.auth_attempts == []
    assert {tuple(c.commands) for c in server.connections} == {("EHLO",)}


@pytest.mark.parametrize("tls", [TlsMode.STARTTLS, TlsMode.IMPLICIT])
@pytest.mark.parametrize("fault", ["untrusted CA", "wrong name"])
async def test_certificate_refused(make_server: ServerFactory, make_pool: PoolFactory, tmp_path: Path,
                                   tls: TlsMode, fault: str) -> None:
    if fault == "untrusted CA":
        server = make_server(tls=tls)
        other_ca = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other_ca))
        pool = make_pool(server, security=tls.value, ca_file=other_ca)
    else:
        server = make_server(tls=tls, cert_names=("mail.example.test",))
        pool = make_pool(server, security=tls.value)

    with pytest.raises(SMTPSecurityError, match="certificate") as raised:
        await pool.send(SENDER, ["ops@example.test"], RAW)

    assert isinstance(raised.value.__cause__, ssl.SSLCertVerificationError | aiosmtplib.SMTPConnectError)
    assert server.received == []
    assert server.auth_attempts == []
    assert auth_commands(server) == []


async def test_wrong_password(server: SmtpServer, make_pool: PoolFactory) -> None:
    with pytest.raises(SMTPSecurityError, match="535") as raised:
        await make_pool(server, password="not-the-password").send(SENDER, ["a@x.test"], RAW)

    assert "not-the-password" not in str(raised.value)
    assert server.auth_attempts and not any(a.success for a in server.auth_attempts)
    assert server.data_attempts == 0


async def test_mail_without_auth_to_a_server_that_requires_it(server: SmtpServer,
                                                              make_pool: PoolFactory) -> None:
    # 530 is our configuration's fault, not the mail's: held, never dead-lettered.
    with pytest.raises(SMTPSecurityError, match="530"):
        await make_pool(server, username="", password=None).send(SENDER, ["a@x.test"], RAW)
    assert server.received == []


# -- replies --------------------------------------------------------------------------------


async def test_recipients_refused_one_by_one(server: SmtpServer, make_pool: PoolFactory) -> None:
    server.reply_to_rcpt("bad@x.test", "550 5.1.1 no such user")
    server.reply_to_rcpt("later@x.test", "451 4.3.0 try later")

    result = await make_pool(server).send(SENDER, ["good@x.test", "bad@x.test", "later@x.test"], RAW)

    assert result.accepted == ("good@x.test",)
    assert result.refused == {"bad@x.test": Reply(550, "5.1.1 no such user"),
                              "later@x.test": Reply(451, "4.3.0 try later")}
    assert [m.rcpt_tos for m in server.received] == [("good@x.test",)]


@pytest.mark.parametrize("reply", ["550 5.1.1 no such user", "451 4.3.0 try later"])
async def test_every_recipient_refused_is_a_result_not_an_error(server: SmtpServer, make_pool: PoolFactory,
                                                               reply: str) -> None:
    server.reply_to_rcpt("a@x.test", reply)
    server.reply_to_rcpt("b@x.test", reply)
    pool = make_pool(server)

    result = await pool.send(SENDER, ["a@x.test", "b@x.test"], RAW)

    code, text = reply.split(" ", 1)
    assert result == SendResult((), {"a@x.test": Reply(int(code), text), "b@x.test": Reply(int(code), text)})
    assert server.data_attempts == 0
    # The envelope was reset and the connection stays usable.
    await pool.send(SENDER, ["c@x.test"], RAW)
    assert len(server.connections) == 1
    assert "RSET" in server.connections[0].commands


async def test_auth_required_at_rcpt_is_our_fault_not_the_recipients(make_server: ServerFactory,
                                                                        make_pool: PoolFactory) -> None:
    server = make_server(rcpt_replies={"a@x.test": "530 5.7.0 Authentication required"})
    with pytest.raises(SMTPSecurityError, match="530"):
        await make_pool(server).send(SENDER, ["a@x.test", "b@x.test"], RAW)
    assert server.received == []


async def test_data_replies_from_the_constructor(make_server: ServerFactory, make_pool: PoolFactory) -> None:
    server = make_server(data_replies=["452 4.3.1 insufficient storage"])
    pool = make_pool(server)
    with pytest.raises(SMTPTemporaryError, match="452"):
        await pool.send(SENDER, ["a@x.test"], RAW)
    await pool.send(SENDER, ["a@x.test"], RAW)
    assert server.data_attempts == 2 and len(server.received) == 1


async def test_refusal_only_the_first_times(server: SmtpServer, make_pool: PoolFactory) -> None:
    server.reply_to_rcpt("later@x.test", "451 4.3.0 try later", times=1)
    pool = make_pool(server)

    first = await pool.send(SENDER, ["later@x.test"], RAW)
    second = await pool.send(SENDER, ["later@x.test"], RAW)

    assert (first.accepted, second.accepted) == ((), ("later@x.test",))


async def test_451_on_data_three_times_then_accepted(server: SmtpServer, make_pool: PoolFactory) -> None:
    server.reply_to_data("451 4.3.0 queue full", times=3)
    pool = make_pool(server)

    for _ in range(3):
        with pytest.raises(SMTPTemporaryError) as raised:
            await pool.send(SENDER, ["a@x.test"], RAW)
        assert (raised.value.code, raised.value.reply) == (451, "4.3.0 queue full")
    assert server.received == []

    await pool.send(SENDER, ["a@x.test"], RAW)
    assert len(server.received) == 1
    # RFC 5321 §4.1.1.4: a refusal at the end of DATA leaves the session usable: one connection.
    assert len(server.connections) == 1


async def test_554_on_data_is_permanent(server: SmtpServer, make_pool: PoolFactory) -> None:
    server.reply_to_data("554 5.6.0 message rejected")
    with pytest.raises(SMTPPermanentError) as raised:
        await make_pool(server).send(SENDER, ["a@x.test"], RAW)
    assert raised.value.code == 554


async def test_an_unsendable_recipient_is_refused_alone(server: SmtpServer, make_pool: PoolFactory) -> None:
    # aiosmtplib's lenient parser would send these as <x@y.test> and <bad>: someone else.
    unsendable = ["x@y.test>\r\nRSET", 'bad"quote@x.test', "a b@x.test"]
    result = await make_pool(server).send(SENDER, ["good@x.test", "<angle@x.test>", *unsendable], RAW)

    assert result.accepted == ("good@x.test", "<angle@x.test>")
    assert {rcpt: reply.code for rcpt, reply in result.refused.items()} == dict.fromkeys(unsendable, 553)
    assert server.received[0].rcpt_tos == ("good@x.test", "angle@x.test")


async def test_an_unsendable_sender_is_permanent(server: SmtpServer, make_pool: PoolFactory) -> None:
    with pytest.raises(SMTPPermanentError):
        await make_pool(server).send("x@y.test\r\nRSET", ["a@x.test"], RAW)
    assert server.connections[0].commands.count("MAIL") == 0


# -- secrets --------------------------------------------------------------------------------


async def test_password_never_reaches_the_logs(make_server: ServerFactory, make_pool: PoolFactory,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    plain = make_server()
    login = make_server(auth_mechanisms=("LOGIN",))
    pool = make_pool(plain)
    await pool.send(SENDER, ["a@x.test"], RAW)
    await pool.check()
    await make_pool(login).send(SENDER, ["a@x.test"], RAW)
    try:
        await make_pool(plain, password=DEFAULT_PASSWORD + "-wrong").send(SENDER, ["a@x.test"], RAW)
    except RelayError:
        logging.getLogger("opsrelay.test").exception("delivery held")  # as the daemon would log it

    assert len(plain.received) == 1 and len(login.received) == 1
    # The logs did see the sessions: client, server (AUTH lines masked) and the error.
    assert "smtp: connected to" in caplog.text
    assert "AUTH PLAIN ****" in caplog.text
    assert "delivery held" in caplog.text and "535" in caplog.text
    secrets = [DEFAULT_PASSWORD, base64.b64encode(DEFAULT_PASSWORD.encode()).decode(),
               base64.b64encode(f"\0{plain.user}\0{DEFAULT_PASSWORD}".encode()).decode()]
    for secret in secrets:
        assert secret not in caplog.text
        assert secret not in repr(pool)
        assert secret not in repr(SmtpConfig.model_validate(plain.client_settings()))


# -- the one translation --------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "setup", "expected"), [
    (aiosmtplib.SMTPDataError(451, "later"), False, SMTPTemporaryError),
    (aiosmtplib.SMTPDataError(552, "too big"), False, SMTPPermanentError),
    (aiosmtplib.SMTPSenderRefused(553, "bad sender", "x"), False, SMTPPermanentError),
    (aiosmtplib.SMTPSenderRefused(530, "5.7.0 Authentication required", "x"), False, SMTPSecurityError),
    (aiosmtplib.SMTPConnectResponseError(421, "busy"), True, SMTPTemporaryError),
    (aiosmtplib.SMTPConnectResponseError(554, "go away"), True, SMTPSecurityError),
    (aiosmtplib.SMTPAuthenticationError(535, "bad credentials"), True, SMTPSecurityError),
    (aiosmtplib.SMTPAuthenticationError(454, "temporary failure"), True, SMTPTemporaryError),
    (aiosmtplib.SMTPException("SMTP STARTTLS extension not supported by server."), True, SMTPSecurityError),
    (aiosmtplib.SMTPReadTimeoutError("slow"), False, SMTPTimeoutError),
    (aiosmtplib.SMTPConnectTimeoutError("slow"), True, SMTPTimeoutError),
    (TimeoutError(), False, SMTPTimeoutError),
    (aiosmtplib.SMTPServerDisconnected("gone"), False, SMTPConnectError),
    (aiosmtplib.SMTPConnectError("refused"), True, SMTPConnectError),
    (ConnectionRefusedError(111, "refused"), True, SMTPConnectError),
    (socket.gaierror(-2, "Name or service not known"), True, SMTPConnectError),
    (ssl.SSLCertVerificationError("certificate verify failed"), True, SMTPSecurityError),
    (aiosmtplib.SMTPNotSupported("SMTPUTF8 is not supported"), False, SMTPPermanentError),
    (ValueError("address contains characters not permitted"), False, SMTPPermanentError),
])
def test_translate_error(exc: Exception, setup: bool, expected: type[RelayError]) -> None:
    assert type(translate_error(exc, setup=setup)) is expected


def test_translate_error_finds_the_tls_failure_inside_a_connect_error() -> None:
    wrapped = aiosmtplib.SMTPConnectError("Error connecting")
    wrapped.__cause__ = ssl.SSLCertVerificationError("certificate verify failed")
    assert isinstance(translate_error(wrapped, setup=True), SMTPSecurityError)
