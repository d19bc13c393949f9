"""SASL XOAUTH2 end to end: the relay (``serve_forever`` with :class:`~relay.delivery.smarthosts.Smarthosts`)
against a real token endpoint and a real XOAUTH2 smarthost (``tests.oauth_servers``), on 127.0.0.1.

Tokens live a second or two, so a relay that caches them too long, fetches one per mail, leaks
one to a log, or loses a rotated refresh token is caught within the run. Every fault of the
token path (the smarthost refusing tokens or not offering XOAUTH2, the endpoint refusing the
grant or down) must hold the mail, never dead-letter it, and deliver it once fixed. The
command-line side (``check --connect``, ``queue --json``, ``oauth2 login``) runs through typer's
CliRunner, in a thread when the relay is running on the test's loop (the CLI has its own loop).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from relay.cli.app import app
from relay.config.models import load_config
from relay.errors import ConfigError
from tests.integration.faults import (
    Broker,
    Ledger,
    Rig,
    Watch,
    fill_outbound,
    new_mail,
    reconcile,
    relay_settings,
    retry_queues,
    running_relay,
    steady_port,
)
from tests.oauth_servers import CLIENT_ID, CLIENT_SECRET, SCOPE, Down, TokenEndpoint, XOAuth2SmtpServer
from tests.smtp_server import DEFAULT_PASSWORD, DEFAULT_USER
from tests.waiting import wait_until

# clean_environment: no OPSRELAY_* from the caller, no config on the search path (the conftest's).
pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("clean_environment")]

BACKOFF = ("200ms", "400ms")
EX_CONFIG, EX_TEMPFAIL = 78, 75
# The loggers whose every line (DEBUG up) must be free of tokens and secrets.
LOGGERS = ("relay", "opsrelay", "httpx", "httpcore")

EndpointFactory = Callable[..., TokenEndpoint]
ServerFactory = Callable[..., XOAuth2SmtpServer]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


@pytest.fixture
def make_endpoint() -> Iterator[EndpointFactory]:
    made: list[TokenEndpoint] = []

    def make(**options: Any) -> TokenEndpoint:
        # A port outside the ephemeral range: an endpoint that goes down comes back on it.
        endpoint = TokenEndpoint(port=steady_port(), **options).start()
        made.append(endpoint)
        return endpoint

    yield make
    for endpoint in reversed(made):
        endpoint.stop()


@pytest.fixture
def make_smarthost(tmp_path: Path) -> Iterator[ServerFactory]:
    made: list[XOAuth2SmtpServer] = []

    def make(endpoint: TokenEndpoint, **options: Any) -> XOAuth2SmtpServer:
        server = XOAuth2SmtpServer(tmp_path / f"smtp{len(made)}", endpoint, **options)
        server.start()
        made.append(server)
        return server

    yield make
    for server in reversed(made):
        server.stop()


@pytest.fixture
async def rig(broker: Broker, make_smarthost: ServerFactory, make_endpoint: EndpointFactory) -> AsyncIterator[Rig]:
    # Depends on the server factories so that engines close (and queues go) before the servers stop.
    made = Rig(broker)
    yield made
    await broker.cleanup()


@pytest.fixture
async def sqlite_rig(tmp_path: Path, prefix: str, make_smarthost: ServerFactory,
                     make_endpoint: EndpointFactory) -> AsyncIterator[Rig]:
    broker = Broker.for_test("sqlite", tmp_path, prefix)
    yield Rig(broker)
    await broker.cleanup()


# -- helpers -----------------------------------------------------------------------------------


def client_credentials(endpoint: TokenEndpoint, **extra: object) -> dict[str, object]:
    return {"grant": "client_credentials", "token_url": endpoint.url, "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET, "scope": SCOPE, "refresh_margin": 0.5, **extra}


def refresh_grant(endpoint: TokenEndpoint, refresh_token_file: Path, **extra: object) -> dict[str, object]:
    return {"grant": "refresh_token", "token_url": endpoint.url, "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET, "refresh_token_file": str(refresh_token_file), "refresh_margin": 0.5,
            **extra}


def refresh_token_file(path: Path, endpoint: TokenEndpoint) -> Path:
    """What ``opsrelay oauth2 login`` leaves, but world-readable: the write-back must make it 0600."""
    path.write_text(endpoint.refresh_token + "\n", encoding="utf-8")
    path.chmod(0o644)
    return path


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _toml(values: Mapping[str, Any], table: str = "") -> list[str]:
    lines = [f"[{table}]"] if table else []
    lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in values.items()
              if v is not None and not isinstance(v, Mapping)]
    for key, value in values.items():
        if isinstance(value, Mapping):
            lines += ["", *_toml(value, f"{table}.{key}" if table else key)]
    return lines


def write_config(settings: Mapping[str, Any], path: Path) -> Path:
    """The settings as TOML, nested tables included (``[smtp.oauth2]``), for the CLI."""
    path.write_text("\n".join(_toml(settings)) + "\n", encoding="utf-8")
    return path


def cli(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), input=input)


def cli_json(*args: str) -> Any:
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def leaked(text: str, endpoint: TokenEndpoint, *more: str) -> int:
    """How many secrets (every token issued, refresh tokens, client secret) appear in ``text``.

    A count, so that a failing assert never prints a secret itself.
    """
    return sum(1 for secret in (*endpoint.secret_values(), *more) if secret and secret in text)


def why_not(logs: pytest.LogCaptureFixture, endpoint: TokenEndpoint, server: XOAuth2SmtpServer) -> str:
    """For a wait that timed out: the relay's last complaint, the AUTH attempts, the endpoint's answers."""
    complaints = [r.getMessage() for r in logs.records
                  if r.name.startswith("opsrelay") and r.levelno >= logging.WARNING]
    return (f"last relay warning: {complaints[-1] if complaints else '(none)'}\n"
            f"AUTH attempts: {server.auth_attempts}\nendpoint: {endpoint.requests}")


def expired(endpoint: TokenEndpoint) -> bool:
    return not any(endpoint.valid(token) for token in endpoint.issued)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def temporaries(folder: Path) -> list[Path]:
    """What an atomic write-back leaves when it fails half-way: ``.<name>.<pid>.tmp``."""
    return sorted(folder.glob(".*.tmp"))


# -- the grants over many token lifetimes --------------------------------------------------------


async def test_refresh_token_grant_renews_before_expiry_for_three_lifetimes_and_keeps_the_rotated_token(
        tmp_path: Path, sqlite_rig: Rig, make_endpoint: EndpointFactory, make_smarthost: ServerFactory,
        logs: pytest.LogCaptureFixture) -> None:
    """A mail every 0.5 s for 7 s (3.5 token lifetimes); the smarthost ends the session after every
    second mail (as providers end long sessions), so each new session authenticates again."""
    endpoint = make_endpoint(lifetime=2.0, rotate=True)
    server = make_smarthost(endpoint)
    first_refresh = endpoint.refresh_token
    token_file = refresh_token_file(tmp_path / "refresh_token", endpoint)
    settings = relay_settings(sqlite_rig.broker, server, backoff=BACKOFF, pool_size=1,
                              oauth2=refresh_grant(endpoint, token_file))
    config, engine = await sqlite_rig.open(settings)
    ledger = Ledger()
    watch = Watch(engine, config, ledger, lambda: server.received)
    mails = 14
    async with running_relay(config) as relay:
        watch.alive = relay.check
        began = time.monotonic()
        for sent in range(1, mails + 1):
            await fill_outbound(engine, config.broker.prefix, ledger, [new_mail([f"ops{sent}@example.test"])])
            await wait_until(lambda n=sent: len(server.received) >= n, 5, what=f"mail {sent} delivered",
                             diagnostics=lambda: why_not(logs, endpoint, server))
            relay.check()
            if sent % 2 == 0:
                server.drop_connections()
            await asyncio.sleep(max(0.0, began + sent * 0.5 - time.monotonic()))  # pacing, not waiting
        lasted = time.monotonic() - began
        await watch.until_settled(10)
    result = await reconcile(watch)

    assert lasted > 3 * endpoint.lifetime
    assert not result.dead
    assert sum(result.delivered.values()) == mails
    assert all(m.tls and m.auth_user == DEFAULT_USER for m in server.received)
    refreshes = endpoint.granted("refresh_token")
    sessions = len(server.xoauth2_attempts)
    assert refreshes > 1, "the token was renewed as it expired"
    assert refreshes <= sessions < mails, "a token per session lifetime at most, not per mail"
    # Renewed refresh_margin before expires_in: the smarthost never saw an expired token.
    assert all(a.success for a in server.xoauth2_attempts), server.xoauth2_attempts
    assert [r.status for r in endpoint.requests] == [200] * refreshes, "every refresh used the saved token"
    # The rotated refresh token was written back, atomically, private.
    assert endpoint.refresh_token != first_refresh
    assert token_file.read_text(encoding="utf-8").strip() == endpoint.refresh_token
    assert mode(token_file) == 0o600
    assert temporaries(tmp_path) == [], "no temporary file left beside it"
    assert "new access token" in logs.text, "the DEBUG capture saw the token path"
    assert leaked(logs.text, endpoint) == 0, "a token or secret reached a log line"

    # opsrelay check --connect --json: the same grant, no secret in what it prints.
    config_file = write_config(settings, tmp_path / "opsrelay.toml")
    report = await asyncio.to_thread(cli_json, "check", "--connect", "--json", "--config", str(config_file))
    assert report["connect"]["smtp"].startswith(f"ok: 127.0.0.1:{server.port}, tls=yes, auth=yes")
    assert f"mechanism=XOAUTH2 (token from refresh_token grant at {endpoint.url})" in report["connect"]["smtp"]
    assert f"XOAUTH2 as {DEFAULT_USER}" in report["smtp"]
    assert leaked(json.dumps(report), endpoint) == 0, "a token or secret in check's output"
    assert token_file.read_text(encoding="utf-8").strip() == endpoint.refresh_token, "check kept the rotation too"


async def test_client_credentials_grant_fetches_once_per_lifetime(
        rig: Rig, make_endpoint: EndpointFactory, make_smarthost: ServerFactory,
        logs: pytest.LogCaptureFixture) -> None:
    """Three batches, each after every token so far expired and the sessions ended: one fetch each."""
    endpoint = make_endpoint(lifetime=1.0)
    server = make_smarthost(endpoint)
    settings = relay_settings(rig.broker, server, backoff=BACKOFF, pool_size=2,
                              oauth2=client_credentials(endpoint, refresh_margin=0.25))
    config, engine = await rig.open(settings)
    ledger = Ledger()
    watch = Watch(engine, config, ledger, lambda: server.received)
    async with running_relay(config) as relay:
        watch.alive = relay.check
        for batch in range(3):
            mails = [new_mail([f"ops{batch}-{i}@example.test"]) for i in range(5)]
            await fill_outbound(engine, config.broker.prefix, ledger, mails)
            await wait_until(watch.poll, 10, what=f"batch {batch} delivered",
                             diagnostics=lambda: f"{watch.summary()}\n{why_not(logs, endpoint, server)}")
            assert endpoint.granted("client_credentials") == batch + 1, endpoint.requests
            server.drop_connections()
            await wait_until(lambda: expired(endpoint), 5, what="every token issued so far to expire")
        await watch.until_settled(10)
    result = await reconcile(watch)

    assert not result.dead
    assert sum(result.delivered.values()) == 15
    assert endpoint.granted("client_credentials") == 3
    assert all(a.success for a in server.xoauth2_attempts), server.xoauth2_attempts
    assert len(server.xoauth2_attempts) <= 6, "at most pool_size sessions per batch"
    assert leaked(logs.text, endpoint) == 0, "a token or secret reached a log line"


TOKEN_SCRIPT = '''#!{python}
"""A token_command: one client_credentials token from the test's endpoint, on stdout."""
import json, urllib.parse, urllib.request
with open({calls!r}, "a") as calls:
    calls.write("run\\n")
form = urllib.parse.urlencode({{"grant_type": "client_credentials", "client_id": {client_id!r},
                               "client_secret": {secret!r}, "scope": {scope!r}}}).encode()
with urllib.request.urlopen(urllib.request.Request({url!r}, data=form), timeout=10) as response:
    print(json.load(response)["access_token"])
'''


def token_script(tmp_path: Path, endpoint: TokenEndpoint) -> tuple[Path, Path]:
    calls = tmp_path / "token-command-calls"
    script = tmp_path / "get token.py"  # a space: the command line is split like a shell's
    script.write_text(TOKEN_SCRIPT.format(python=sys.executable, calls=str(calls), client_id=CLIENT_ID,
                                          secret=CLIENT_SECRET, scope=SCOPE, url=endpoint.url), encoding="utf-8")
    script.chmod(0o700)
    return script, calls


def runs(calls: Path) -> int:
    return len(calls.read_text(encoding="utf-8").splitlines()) if calls.exists() else 0


async def test_token_command_is_asked_again_at_once_when_the_smarthost_refuses_its_token(
        tmp_path: Path, sqlite_rig: Rig, make_endpoint: EndpointFactory, make_smarthost: ServerFactory,
        logs: pytest.LogCaptureFixture) -> None:
    """token_lifetime (60 s) outlives the endpoint's tokens (1.5 s): the 535 is what tells the relay."""
    endpoint = make_endpoint(lifetime=1.5)
    server = make_smarthost(endpoint)
    script, calls = token_script(tmp_path, endpoint)
    settings = relay_settings(sqlite_rig.broker, server, backoff=BACKOFF, pool_size=1,
                              oauth2={"token_command": shlex.join([str(script)]), "token_lifetime": 60})
    config, engine = await sqlite_rig.open(settings)
    ledger = Ledger()
    watch = Watch(engine, config, ledger, lambda: server.received)
    async with running_relay(config) as relay:
        watch.alive = relay.check
        await fill_outbound(engine, config.broker.prefix, ledger, [new_mail(["first@example.test"])])
        await wait_until(lambda: len(server.received) == 1, 10, what="the first mail delivered",
                         diagnostics=lambda: why_not(logs, endpoint, server))
        assert runs(calls) == 1
        await wait_until(lambda: expired(endpoint), 5, what="the command's token to expire")
        server.drop_connections()  # the next mail needs a new session, so AUTH with the kept token
        await fill_outbound(engine, config.broker.prefix, ledger, [new_mail(["second@example.test"])])
        await watch.until_settled(10)
    result = await reconcile(watch)

    assert not result.dead and sum(result.delivered.values()) == 2
    assert runs(calls) == 2, "asked once at start, once after the 535"
    attempts = server.xoauth2_attempts
    assert [a.success for a in attempts] == [True, False, True], attempts
    assert attempts[1].connection == attempts[2].connection, "asked again at once, in the same session"
    assert "refused the access token" in logs.text
    assert "DELIVERY HELD" not in logs.text and "failed for now" not in logs.text, "no retry was needed"
    assert leaked(logs.text, endpoint) == 0, "a token or secret reached a log line"


# -- faults hold the mail until fixed ----------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    grant: str  # client_credentials | refresh_token
    expected: str  # in x-held, lowercased
    cause: Callable[[TokenEndpoint, XOAuth2SmtpServer], None]
    fix: Callable[[TokenEndpoint, XOAuth2SmtpServer], None]
    fetches: bool = True  # whether the relay gets as far as asking the endpoint


FAULTS = {
    "smarthost-refuses-every-token": Fault(
        "client_credentials", "refused the xoauth2 token",
        lambda e, s: s.refuse_tokens(), lambda e, s: s.refuse_tokens(False)),
    "endpoint-refuses-the-grant": Fault(
        "refresh_token", "refused the refresh_token grant: http 400 invalid_grant",
        lambda e, s: e.refuse(), lambda e, s: e.refuse(False)),
    "endpoint-not-listening": Fault(
        "client_credentials", "unavailable", lambda e, s: e.go_down(Down.CLOSED), lambda e, s: e.come_back()),
    "endpoint-503": Fault(
        "client_credentials", "http 503 temporarily_unavailable",
        lambda e, s: e.go_down(Down.UNAVAILABLE), lambda e, s: e.come_back()),
    "smarthost-without-xoauth2": Fault(
        "client_credentials", "does not offer auth xoauth2",
        lambda e, s: s.offer_xoauth2(False), lambda e, s: s.offer_xoauth2(True), fetches=False),
}


@pytest.mark.parametrize("fault_name", list(FAULTS))
async def test_token_faults_hold_the_mail_until_fixed_never_dead_letter_it(
        tmp_path: Path, rig: Rig, make_endpoint: EndpointFactory, make_smarthost: ServerFactory,
        logs: pytest.LogCaptureFixture, fault_name: str) -> None:
    fault = FAULTS[fault_name]
    endpoint = make_endpoint(lifetime=30.0)
    # The one without XOAUTH2 offers password AUTH instead: the relay must not fall back to it.
    server = make_smarthost(endpoint, password_auth=True)
    oauth2 = (client_credentials(endpoint) if fault.grant == "client_credentials"
              else refresh_grant(endpoint, refresh_token_file(tmp_path / "refresh_token", endpoint)))
    settings = relay_settings(rig.broker, server, backoff=BACKOFF, max_attempts=2, oauth2=oauth2)
    config, engine = await rig.open(settings)
    config_file = write_config(settings, tmp_path / "opsrelay.toml")
    mail = new_mail(["oncall@example.test"])
    ledger = Ledger()
    watch = Watch(engine, config, ledger, lambda: server.received)
    fault.cause(endpoint, server)
    await fill_outbound(engine, config.broker.prefix, ledger, [mail])
    async with running_relay(config) as relay:
        watch.alive = relay.check
        report: dict[str, Any] = {}

        async def listed_as_held_often() -> bool:
            """`opsrelay queue --json` lists it held, after more holds than max_attempts would allow."""
            relay.check()
            report.update(await asyncio.to_thread(cli_json, "queue", "--json", "--config", str(config_file)))
            return any(h["id"] == mail.message_id and h["holds"] > 2 for h in report["held"])

        await wait_until(listed_as_held_often, 20, what="the mail listed as held", interval=0.1,
                         diagnostics=lambda: f"queue --json: {report}")
        [held] = [h for h in report["held"] if h["id"] == mail.message_id]
        assert held["queue"] in retry_queues(config)
        assert fault.expected in held["fault"].lower(), held["fault"]
        assert held["recipients"] == ["oncall@example.test"]
        assert [q["ready"] for q in report["queues"] if q["role"] == "dead"] == [0]
        await watch.collect()
        assert not watch.dead, [m.headers.get("x-dead-reason") for m in watch.dead]
        assert not server.received
        assert [a for a in server.auth_attempts if a.mechanism != "XOAUTH2"] == [], "no password AUTH"
        if not fault.fetches:
            assert endpoint.requests == [], "no token fetched for a smarthost that cannot take it"
        fault.fix(endpoint, server)
        await watch.until_settled(15)
    result = await reconcile(watch)

    assert not result.dead
    assert result.delivered[(mail.message_id, "oncall@example.test")] == 1
    [received] = server.received
    assert received.tls and received.auth_user == DEFAULT_USER
    assert "DELIVERY HELD" in logs.text
    assert leaked(logs.text + json.dumps(report), endpoint) == 0, "a token or secret reached a log line"


# -- configuration and the command line ----------------------------------------------------------------


def oauth2_toml(tmp_path: Path, smtp: str, oauth2: str) -> Path:
    path = tmp_path / "opsrelay.toml"
    path.write_text(f'host = "web1"\n[broker]\nurl = "sqlite:///{tmp_path}/queue.db"\n'
                    f'[smtp]\nfrom = "alerts@example.test"\n{smtp}\n[smtp.oauth2]\n{oauth2}\n', encoding="utf-8")
    return path


SMARTHOST = 'host = "smtp.example.com"\nusername = "alerts@example.test"\n'
CLIENT = f'grant = "client_credentials"\nclient_id = "{CLIENT_ID}"\nclient_secret = "{CLIENT_SECRET}"\n'


@pytest.mark.parametrize(("smtp", "oauth2", "key", "words"), [
    pytest.param(SMARTHOST, CLIENT + 'token_url = "http://login.example.com/token"\n', "smtp.oauth2",
                 "token_url must be https://", id="http-token-url-to-a-remote-host"),
    pytest.param(SMARTHOST, CLIENT + 'token_url = "https://login.example.com/token"\n'
                                     'auth_url = "http://login.example.com/authorize"\n', "smtp.oauth2",
                 "auth_url must be https://", id="http-auth-url-to-a-remote-host"),
    pytest.param(SMARTHOST + f'password = "{DEFAULT_PASSWORD}"\n',
                 CLIENT + 'token_url = "https://login.example.com/token"\n', "smtp",
                 "set no password", id="password-and-oauth2"),
    pytest.param('host = "smtp.example.com"\n', CLIENT + 'token_url = "https://login.example.com/token"\n', "smtp",
                 "username is the mailbox", id="oauth2-without-username"),
    pytest.param(SMARTHOST, 'token_command = "get-token"\n' + CLIENT + 'token_url = "https://x.example/t"\n',
                 "smtp.oauth2", "set either token_command or grant", id="command-and-grant"),
])
def test_bad_oauth2_config_is_one_line_and_exits_78(tmp_path: Path, smtp: str, oauth2: str, key: str,
                                                    words: str) -> None:
    path = oauth2_toml(tmp_path, smtp, oauth2)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and key in message and words in message, message
    result = cli("check", "--config", str(path))
    assert result.exit_code == EX_CONFIG, result.output
    [line] = result.stderr.splitlines()
    assert words in line
    assert CLIENT_SECRET not in result.output and DEFAULT_PASSWORD not in result.output


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/token", "http://[::1]:8080/token",
                                 "http://localhost:8080/token", "https://login.example.com/token"])
def test_token_url_may_be_plain_http_only_to_loopback(tmp_path: Path, url: str) -> None:
    config = load_config(oauth2_toml(tmp_path, SMARTHOST, CLIENT + f'token_url = "{url}"\n'), env={})
    assert config.smtp.oauth2 is not None and config.smtp.oauth2.token_url == url
    assert config.smtp.mechanism == "XOAUTH2"
    assert CLIENT_SECRET not in repr(config)


@pytest.mark.parametrize("source", ["client_credentials", "token_command"])
def test_check_connect_says_xoauth2_and_where_the_token_comes_from(
        tmp_path: Path, make_endpoint: EndpointFactory, make_smarthost: ServerFactory, source: str) -> None:
    endpoint = make_endpoint(lifetime=30.0)
    server = make_smarthost(endpoint)
    script, calls = token_script(tmp_path, endpoint)
    oauth2 = (client_credentials(endpoint) if source == "client_credentials"
              else {"token_command": shlex.join([str(script)])})
    broker = Broker("sqlite", f"sqlite:///{tmp_path}/queue.db", "ops")
    config_file = write_config(relay_settings(broker, server, oauth2=oauth2), tmp_path / "opsrelay.toml")
    result = cli("check", "--connect", "--config", str(config_file))

    assert result.exit_code == 0, result.output
    where = f"{source} grant at {endpoint.url}" if source == "client_credentials" else f"token_command {script}"
    assert f"smtp 127.0.0.1:{server.port} (starttls, XOAUTH2 as {DEFAULT_USER}, token from {where})" in result.stdout
    assert (f"  smtp: ok: 127.0.0.1:{server.port}, tls=yes, auth=yes, mechanism=XOAUTH2 (token from {where})"
            in result.stdout), result.stdout
    assert [(a.mechanism, a.success) for a in server.auth_attempts] == [("XOAUTH2", True)]
    assert server.received == [], "check sends no mail"
    assert runs(calls) == (1 if source == "token_command" else 0)
    assert leaked(result.output, endpoint) == 0, "a token or secret in check's output"


def test_check_connect_fails_on_a_smarthost_without_xoauth2(
        tmp_path: Path, make_endpoint: EndpointFactory, make_smarthost: ServerFactory) -> None:
    endpoint = make_endpoint()
    server = make_smarthost(endpoint, offer_xoauth2=False, password_auth=True)
    broker = Broker("sqlite", f"sqlite:///{tmp_path}/queue.db", "ops")
    config_file = write_config(relay_settings(broker, server, oauth2=client_credentials(endpoint)),
                               tmp_path / "opsrelay.toml")
    result = cli("check", "--connect", "--config", str(config_file))

    assert result.exit_code != 0
    assert "  smtp: FAILED:" in result.stdout and "does not offer AUTH XOAUTH2" in result.stdout, result.stdout
    assert server.auth_attempts == [] and endpoint.requests == []


def login_config(tmp_path: Path, endpoint: TokenEndpoint, token_file: Path) -> Path:
    return oauth2_toml(tmp_path, SMARTHOST, (
        f'grant = "refresh_token"\ntoken_url = "{endpoint.url}"\nclient_id = "{CLIENT_ID}"\n'
        f'client_secret = "{CLIENT_SECRET}"\nscope = "{SCOPE}"\nrefresh_token_file = "{token_file}"\n'
        f'auth_url = "http://127.0.0.1:{endpoint.port}/authorize"\n'))


def test_oauth2_login_trades_the_pasted_code_for_a_private_refresh_token(
        tmp_path: Path, make_endpoint: EndpointFactory) -> None:
    endpoint = make_endpoint()
    token_file = tmp_path / "secrets" / "refresh_token"
    token_file.parent.mkdir()
    code = endpoint.new_code()
    result = cli("oauth2", "login", "--config", str(login_config(tmp_path, endpoint, token_file)),
                 input=f"{code}\n")

    assert result.exit_code == 0, result.output
    assert f"http://127.0.0.1:{endpoint.port}/authorize?response_type=code&client_id={CLIENT_ID}" in result.stderr
    assert f"refresh token written to {token_file} (mode 0600)" in result.stdout
    assert token_file.read_text(encoding="utf-8") == endpoint.refresh_token + "\n"
    assert mode(token_file) == 0o600
    assert [(r.grant_type, r.status) for r in endpoint.requests] == [("authorization_code", 200)]
    assert code not in result.output, "the pasted code is not echoed"
    assert leaked(result.output, endpoint, code) == 0


def test_oauth2_login_with_a_wrong_code_writes_nothing_and_exits_75(
        tmp_path: Path, make_endpoint: EndpointFactory) -> None:
    endpoint = make_endpoint()
    token_file = tmp_path / "refresh_token"
    result = cli("oauth2", "login", "--config", str(login_config(tmp_path, endpoint, token_file)),
                 input="not-a-code-we-issued\n")

    assert result.exit_code == EX_TEMPFAIL, result.output
    assert "invalid_grant" in result.stderr.splitlines()[-1]
    assert not token_file.exists()
    assert leaked(result.output, endpoint) == 0
