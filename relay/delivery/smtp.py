"""Delivery through the smarthost: aiosmtplib sessions and a small connection pool.

Every aiosmtplib, ``ssl`` and socket error becomes a :mod:`relay.errors` class in
:func:`translate_error`, and nowhere else. TLS fails closed: with
``security = "starttls"`` a server that does not offer STARTTLS gets neither our
credentials nor the mail, and certificates are always verified (``ca_file`` adds a
trust anchor to the system's). :class:`SmtpPool` is a :class:`relay.delivery.outcome.Mailer`
(tests have an in-memory twin in ``tests/doubles.py``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import aiosmtplib
from aiosmtplib import SMTPStatus
from aiosmtplib.email import parse_address

from relay.config.smarthost import Security, SmarthostConfig
from relay.delivery.outcome import Budget, Reply, SendResult, ServerInfo, SessionFault
from relay.delivery.quota import is_quota_reply
from relay.errors import (
    RelayError,
    SMTPConnectError,
    SMTPPermanentError,
    SMTPQuotaError,
    SMTPSecurityError,
    SMTPTemporaryError,
    SMTPTimeoutError,
)

__all__ = [
    "SmtpPool",
    "translate_error",
]

if TYPE_CHECKING:
    from relay.delivery.oauth2 import TokenSource

log = logging.getLogger(__name__)


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """aiosmtplib wraps a failed implicit-TLS handshake in its SMTPConnectError."""
    chain: BaseException | None = exc
    seen: set[int] = set()
    while chain is not None and id(chain) not in seen:
        if isinstance(chain, ssl.SSLError):
            return chain
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
    return None


def translate_error(exc: Exception, *, setup: bool = False) -> RelayError:
    """The one place where aiosmtplib, ssl and OSError exceptions become relay.errors.

    ``setup`` is true while the session is being set up (greeting, EHLO, STARTTLS,
    AUTH): a 5xx there is the smarthost refusing us, not the mail, so it is a
    configuration fault (held, never dead-lettered) rather than a permanent error.
    """
    if isinstance(exc, RelayError):
        return exc
    if (tls_error := _ssl_cause(exc)) is not None:
        return SMTPSecurityError(f"TLS with the smarthost failed: {tls_error}")
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        if exc.code // 100 == SMTPStatus.error_processing // 100:  # RFC 4954 454: try AUTH later
            return SMTPTemporaryError(exc.code, exc.message)
        return SMTPSecurityError(f"AUTH rejected: {exc.code} {exc.message}")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        code, text = exc.code, exc.message
        if code // 100 == SMTPStatus.mailbox_does_not_exist // 100:
            # 530: "authentication required" (we sent no AUTH): our configuration, not the mail.
            if setup or code == SMTPStatus.access_denied:
                return SMTPSecurityError(f"the smarthost refused the session: {code} {text}")
            return SMTPPermanentError(code, text)
        return SMTPTemporaryError(code, text)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return SMTPTimeoutError(f"the smarthost did not answer in time: {exc}")
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return SMTPConnectError(f"the smarthost closed the connection: {exc}")
    if isinstance(exc, aiosmtplib.SMTPConnectError | OSError):
        return SMTPConnectError(str(exc))
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return SMTPPermanentError(SMTPStatus.mailbox_name_invalid, str(exc))
    if isinstance(exc, aiosmtplib.SMTPException):
        # aiosmtplib's bare SMTPException covers session setup it could not do as asked:
        # STARTTLS not offered, no AUTH extension, no common AUTH mechanism.
        return SMTPSecurityError(f"the session could not be set up as configured: {exc}")
    if isinstance(exc, ValueError):
        # An address that cannot be put on an SMTP command line.
        return SMTPPermanentError(SMTPStatus.mailbox_name_invalid, str(exc))
    return SMTPConnectError(f"unexpected {type(exc).__name__}: {exc}")


def _tls_context(config: SmarthostConfig) -> ssl.SSLContext:
    # Verification stays on: ca_file adds a trust anchor, it never replaces the check.
    context = ssl.create_default_context()
    if config.ca_file is not None:
        context.load_verify_locations(cafile=str(config.ca_file))
    return context


class _Answered(Exception):
    """The server refused the mail at the end of DATA; the session itself is fine."""

    def __init__(self, error: RelayError | SessionFault) -> None:
        super().__init__(str(error))
        self.error = error


class _Stale(Exception):
    """A reused connection died while idle; nothing of this mail reached the server."""


class SmtpPool:
    """Up to ``pool_size`` connections to one smarthost, reused across messages.

    :meth:`transact` tells the session's faults (the smarthost cannot take mail: connect, TLS,
    AUTH, MAIL FROM refused, 421, quota) apart from the mail's, by raising
    :class:`~relay.delivery.outcome.SessionFault` for the former; :meth:`send` is the plain
    :class:`~relay.delivery.outcome.Mailer` view for one smarthost.
    """

    def __init__(self, config: SmarthostConfig, *, pool_size: int | None = None,
                 tokens: TokenSource | None = None) -> None:
        self._config = config
        self.name = config.name
        self._tls = _tls_context(config) if config.security is not Security.NONE else None
        self._slots = asyncio.Semaphore(pool_size or int(getattr(config, "pool_size", 2)))
        if tokens is None and config.oauth2 is not None:
            from relay.delivery.oauth2 import token_source

            tokens = token_source(config.oauth2)
        self._tokens = tokens
        self._idle: deque[aiosmtplib.SMTP] = deque()
        self._helo = config.helo
        self._closed = False

    def __repr__(self) -> str:  # no secret here, ever
        c = self._config
        return f"SmtpPool({c.host}:{c.effective_port}, {c.security.value}, user={c.username or '-'})"

    async def _open(self) -> aiosmtplib.SMTP:
        c = self._config
        if self._helo is None:
            self._helo = await asyncio.to_thread(socket.getfqdn)
        client = aiosmtplib.SMTP(
            hostname=c.host, port=c.effective_port, timeout=c.timeout, local_hostname=self._helo,
            use_tls=c.security is Security.TLS,
            # True, never aiosmtplib's opportunistic None: no STARTTLS offered -> no session.
            start_tls=c.security is Security.STARTTLS,
            tls_context=self._tls,
        )
        try:
            await client.connect()
            # RFC 3207 §4.2: what the server said before STARTTLS is void (aiosmtplib forgets
            # it); ask again over TLS before looking for AUTH.
            await client.ehlo()
            tls = client.get_transport_info("sslcontext") is not None
            if c.security is not Security.NONE and not tls:
                raise SMTPSecurityError("the session is not encrypted")
            if self._tokens is not None:
                await self._xoauth2(client, self._tokens)
            elif c.username:
                if not client.supports_extension("auth"):
                    raise SMTPSecurityError("the smarthost offers no AUTH; credentials not sent")
                await client.login(c.username, c.secret)
        except RelayError:
            _discard(client)
            raise
        except Exception as exc:
            _discard(client)
            raise translate_error(exc, setup=True) from exc
        except BaseException:
            _discard(client)
            raise
        log.debug("smtp: connected to %s (%s) as %s, AUTH %s", self.name, c.security.value,
                  c.username or "-", c.mechanism)
        return client

    async def _xoauth2(self, client: aiosmtplib.SMTP, tokens: TokenSource) -> None:
        """SASL XOAUTH2; a refused token is asked for again once, at once (it may have been revoked)."""
        # aiosmtplib keeps the EHLO AUTH list lower case.
        if "xoauth2" not in {m.lower() for m in client.server_auth_methods}:
            raise SMTPSecurityError(f"{self.name} does not offer AUTH XOAUTH2 (it offers "
                                    f"{' '.join(client.server_auth_methods) or 'no AUTH'}); nothing was sent")
        for last in (False, True):
            token = await tokens.token()
            try:
                await client.auth_xoauth2(self._config.username, token)
                return
            except aiosmtplib.SMTPAuthenticationError as exc:
                tokens.refused()
                if exc.code // 100 == SMTPStatus.error_processing // 100:  # RFC 4954 454: try later
                    raise SMTPTemporaryError(exc.code, exc.message) from None
                if last:
                    raise SMTPSecurityError(f"{self.name} refused the XOAUTH2 token of {tokens.describe} "
                                            f"twice: {exc.code} {exc.message}") from None
                log.info("smtp: %s refused the access token (%s); asking %s for a new one",
                         self.name, exc.code, tokens.describe)

    async def send(self, sender: str, recipients: Sequence[str], raw: bytes, *,
                   budget: Budget | None = None) -> SendResult:
        """One transaction. Raises a RelayError when the whole mail failed.

        Budgets and fallbacks are :class:`relay.delivery.smarthosts.Smarthosts`' (the relay's
        Mailer); a lone pool counts no budget, so it refuses to be given one it would ignore.
        """
        if budget is not None and (self._config.max_per_minute or self._config.max_per_day):
            raise ValueError(f"{self.name} has a sending budget: deliver through Smarthosts")
        try:
            return await self.transact(sender, recipients, raw)
        except SessionFault as fault:
            raise fault.error from fault.error.__cause__

    async def transact(self, sender: str, recipients: Sequence[str], raw: bytes) -> SendResult:
        """One transaction: SessionFault when this smarthost could not take mail at all (another
        may), a RelayError when the mail failed here, else who was accepted and refused."""
        if self._closed:
            raise SMTPConnectError("the SMTP pool is closed")
        async with self._slots:
            client, reused = None, False
            while self._idle and client is None:
                candidate = self._idle.pop()
                if candidate.is_connected:
                    client, reused = candidate, True
                else:
                    _discard(candidate)
            if client is None:
                client = await self._session()
            try:
                try:
                    result = await self._transact(client, sender, recipients, raw, stale_ok=reused)
                except _Stale:
                    _discard(client)
                    log.debug("smtp: idle connection was closed by the server; reconnecting")
                    client = await self._session()
                    result = await self._transact(client, sender, recipients, raw, stale_ok=False)
            except _Answered as answered:
                if self._closed:
                    _discard(client)
                else:
                    self._idle.append(client)
                raise answered.error from answered.__cause__
            except BaseException:
                _discard(client)
                raise
            if self._closed or not client.is_connected:
                _discard(client)
            else:
                self._idle.append(client)
            quota = next((r for r in result.refused.values() if is_quota_reply(r.code, r.text)), None)
            if quota is not None and not result.accepted:
                # The provider's limit, and nothing went: the next smarthost may take the whole mail.
                # With some recipients accepted the mail is sent: the plan holds only the others.
                raise SessionFault(self.name, SMTPQuotaError(quota.code, quota.text))
            return SendResult(result.accepted, result.refused, result.reply, smarthost=self.name)

    async def _session(self) -> aiosmtplib.SMTP:
        try:
            return await self._open()
        except RelayError as exc:
            raise SessionFault(self.name, exc) from exc

    async def _transact(self, client: aiosmtplib.SMTP, sender: str, recipients: Sequence[str],
                        raw: bytes, *, stale_ok: bool) -> SendResult:
        options, encoding = _mail_options(client, sender, recipients, raw)
        accepted: list[str] = []
        refused: dict[str, Reply] = {}
        try:
            await client.mail(_mailbox(sender), options=options, encoding=encoding)
            for rcpt in recipients:
                try:
                    await client.rcpt(_mailbox(rcpt), encoding=encoding)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    # 421: the server is closing the session; 530: it wants AUTH from us.
                    # Neither is about this recipient.
                    if exc.code in (SMTPStatus.domain_unavailable, SMTPStatus.access_denied):
                        raise
                    refused[rcpt] = Reply(exc.code, exc.message)
                except ValueError as exc:  # not sendable on a command line: refuse it alone
                    error = translate_error(exc)
                    assert isinstance(error, SMTPPermanentError)
                    refused[rcpt] = Reply(error.code, error.reply)
                else:
                    accepted.append(rcpt)
        except ValueError as exc:  # the sender cannot be put on a command line: the mail's fault
            raise translate_error(exc) from exc
        except Exception as exc:
            # Before DATA nothing was accepted, so a connection that died while idle may
            # be replaced and the transaction replayed on a fresh one.
            gone = isinstance(exc, aiosmtplib.SMTPServerDisconnected) or (
                isinstance(exc, aiosmtplib.SMTPResponseException)
                and exc.code == SMTPStatus.domain_unavailable)
            if stale_ok and gone:
                raise _Stale from exc
            # MAIL FROM refused, 421, 530, a lost connection: this smarthost takes no mail now.
            raise SessionFault(self.name, self._quota_or(exc)) from exc
        if not accepted:
            await _reset(client)
            return SendResult((), refused, None)
        try:
            # Never replayed: once DATA is sent the server may have taken the mail.
            response = await client.data(raw)
        except aiosmtplib.SMTPResponseException as exc:
            if is_quota_reply(exc.code, exc.message):
                raise _Answered(SessionFault(self.name, SMTPQuotaError(exc.code, exc.message))) from exc
            if exc.code == SMTPStatus.domain_unavailable or not client.is_connected:  # 421: closing
                raise SessionFault(self.name, translate_error(exc)) from exc
            # RFC 5321 §4.1.1.4: after the reply to the end of DATA the session is ready for the
            # next MAIL: keep the connection (a 451 storm must not cost a TLS handshake each).
            raise _Answered(translate_error(exc)) from exc
        except Exception as exc:
            raise translate_error(exc) from exc
        return SendResult(tuple(accepted), refused, Reply(response.code, response.message))

    def _quota_or(self, exc: Exception) -> RelayError:
        if isinstance(exc, aiosmtplib.SMTPResponseException) and is_quota_reply(exc.code, exc.message):
            return SMTPQuotaError(exc.code, exc.message)
        return translate_error(exc, setup=True)

    async def check(self) -> ServerInfo:
        """Connect, EHLO, TLS, AUTH, QUIT: no mail. Raises a RelayError on any fault."""
        client = await self._open()
        try:
            info = ServerInfo(
                host=self._config.host, port=self._config.effective_port,
                tls=client.get_transport_info("sslcontext") is not None,
                authenticated=bool(self._config.username),
                extensions=tuple(sorted(client.esmtp_extensions)),
                mechanism=self._config.mechanism,
                token_source=self._tokens.describe if self._tokens is not None else "",
            )
            await _quit(client, self._config.timeout)
        except Exception as exc:
            raise translate_error(exc, setup=True) from exc
        finally:
            _discard(client)
        return info

    async def close(self) -> None:
        self._closed = True
        closer = getattr(self._tokens, "close", None)
        if closer is not None:
            await closer()
        while self._idle:
            client = self._idle.pop()
            try:
                await _quit(client, min(self._config.timeout, 5.0))
            except Exception:  # noqa: S110 - best effort goodbye; the socket is closed below
                pass
            finally:
                _discard(client)


def _mail_options(client: aiosmtplib.SMTP, sender: str, recipients: Sequence[str],
                  raw: bytes) -> tuple[list[str], str]:
    options: list[str] = []
    if client.supports_extension("size"):
        options.append(f"SIZE={len(raw)}")  # RFC 1870: an estimate is allowed
    if not raw.isascii() and client.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")  # RFC 6152
    if not all(address.isascii() for address in (sender, *recipients)) \
            and client.supports_extension("smtputf8"):
        options.append("SMTPUTF8")  # RFC 6531: UTF-8 in the envelope
        return options, "utf-8"
    return options, "ascii"


def _discard(client: aiosmtplib.SMTP) -> None:
    """Drop a connection at once. aiosmtplib's close() starts a TLS goodbye that needs
    further loop turns; a connection we no longer trust or need does not get one."""
    if isinstance(client.transport, asyncio.Transport):
        client.transport.abort()
    client.close()


async def _quit(client: aiosmtplib.SMTP, seconds: float) -> None:
    # QUIT by hand: aiosmtplib's quit() would close() with the slow TLS goodbye; we discard.
    response = await client.execute_command(b"QUIT", timeout=seconds)
    if response.code != SMTPStatus.closing:
        raise aiosmtplib.SMTPResponseException(response.code, response.message)


def _mailbox(address: str) -> str:
    """The address as given, or ValueError: aiosmtplib's parser would quietly rewrite
    ``bad"quote@example.com`` into ``<bad>`` and mail someone else."""
    bare = address.strip()
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1]
    if parse_address(bare) != bare:
        raise ValueError(f"{address!r} is not a plain mailbox")
    return bare


async def _reset(client: aiosmtplib.SMTP) -> None:
    """RSET after MAIL without DATA; a connection that cannot reset is not reused."""
    try:
        await client.rset()
    except Exception:
        _discard(client)


