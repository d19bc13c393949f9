"""relay.config: discovery order, environment overrides, secrets, one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from relay.config import loader as config_module
from relay.config.loader import find_config
from relay.config.models import Config, Security, Subscription, load_config
from relay.errors import ConfigError
from relay.timing import format_duration, parse_duration

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "opsrelay.toml"

SUBSCRIPTION = '[[subscriptions]]\nname = "crashes"\nto = ["oncall@example.com"]\n'


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env)
    return info.value


def assert_one_line(err: ConfigError, path: Path, key: str, problem: str) -> None:
    text = str(err)
    assert "\n" not in text and "\r" not in text, text
    assert str(path) in text, text
    assert key in text, text
    assert re.search(problem, text), text


# -- discovery -----------------------------------------------------------------------------


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A working directory and a HOME of our own, each with a config naming a different host."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return {
        "explicit": write(tmp_path / "explicit.toml", 'host = "explicit"\n'),
        "env": write(tmp_path / "env.toml", 'host = "env"\n'),
        "cwd": write(cwd / "opsrelay.toml", 'host = "cwd"\n'),
        "home": write(home / ".config" / "opsrelay" / "opsrelay.toml", 'host = "home"\n'),
    }


def test_search_path_order_is_the_documented_one() -> None:
    assert config_module.SEARCH_PATHS == (
        "./opsrelay.toml",
        "~/.config/opsrelay/opsrelay.toml",
        "/etc/opsrelay/opsrelay.toml",
    )


def test_explicit_path_wins_over_everything(places: dict[str, Path]) -> None:
    env = {"OPSRELAY_CONFIG": str(places["env"])}
    assert find_config(places["explicit"], env) == str(places["explicit"])
    assert load_config(places["explicit"], env=env).host == "explicit"


def test_env_variable_wins_over_search_path(places: dict[str, Path]) -> None:
    env = {"OPSRELAY_CONFIG": str(places["env"])}
    assert find_config(None, env) == str(places["env"])
    assert load_config(None, env=env).host == "env"


def test_empty_env_variable_is_ignored(places: dict[str, Path]) -> None:
    assert load_config(None, env={"OPSRELAY_CONFIG": ""}).host == "cwd"


def test_working_directory_wins_over_home(places: dict[str, Path]) -> None:
    assert find_config(None, {}) == "./opsrelay.toml"
    assert load_config(None, env={}).host == "cwd"


def test_home_config_when_working_directory_has_none(places: dict[str, Path]) -> None:
    places["cwd"].unlink()
    assert find_config(None, {}) == str(places["home"])
    assert load_config(None, env={}).host == "home"


@pytest.mark.skipif(Path("/etc/opsrelay/opsrelay.toml").exists(), reason="this machine has a system config")
def test_nothing_found_gives_defaults(places: dict[str, Path]) -> None:
    places["cwd"].unlink()
    places["home"].unlink()
    assert find_config(None, {}) is None
    config = load_config(None, env={})
    assert config.subscriptions == ()
    assert config.smtp.security is Security.STARTTLS
    assert config.smtp.effective_port == 587


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    err = config_error(missing)
    assert_one_line(err, missing, "", "no such file")


def test_missing_file_named_by_env_is_an_error_not_a_fallback(places: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "gone.toml"
    with pytest.raises(ConfigError, match="no such file") as info:
        load_config(None, env={"OPSRELAY_CONFIG": str(missing)})
    assert str(missing) in str(info.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[smtp\nhost = 1\n")
    assert_one_line(config_error(path), path, "", "not valid TOML.*line 1")


# -- environment overrides -----------------------------------------------------------------


def test_env_password_overrides_file_and_its_password_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[smtp]\nusername = "u"\npassword_file = "/nonexistent/secret"\n')
    config = load_config(path, env={"OPSRELAY_SMTP__PASSWORD": "from-env"})
    assert config.smtp.secret == "from-env"
    assert config.smtp.password_file is None


def test_env_password_replaces_file_password(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[smtp]\nusername = "u"\npassword = "from-file"\n')
    assert load_config(path, env={"OPSRELAY_SMTP__PASSWORD": "from-env"}).smtp.secret == "from-env"


def test_env_port_is_coerced_to_int(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[smtp]\nport = 587\n")
    config = load_config(path, env={"OPSRELAY_SMTP__PORT": "2525"})
    assert config.smtp.port == 2525
    assert config.smtp.effective_port == 2525


def test_env_json_list_override(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[retry]\nbackoff = ["30s"]\n')
    config = load_config(path, env={"OPSRELAY_RETRY__BACKOFF": '["500ms", "2m", 3]'})
    assert config.retry.backoff == (0.5, 120.0, 3.0)


def test_env_json_subscriptions_override(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", SUBSCRIPTION)
    env = {"OPSRELAY_SUBSCRIPTIONS": '[{"name": "env", "to": ["env@example.com"], "states": ["FATAL"]}]'}
    (sub,) = load_config(path, env=env).subscriptions
    assert (sub.name, sub.to, sub.states) == ("env", ("env@example.com",), ("FATAL",))


def test_env_top_level_and_unrelated_variables(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", 'host = "file"\n')
    env = {"OPSRELAY_HOST": "env-host", "OPSRELAY_CONFIG": str(path), "PATH": "/bin", "SMTP__PORT": "x"}
    assert load_config(path, env=env).host == "env-host"


def test_bad_env_value_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "")
    err = config_error(path, {"OPSRELAY_SMTP__PORT": "not-a-port"})
    assert_one_line(err, path, "smtp.port", "integer")


def test_unknown_env_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "")
    assert_one_line(config_error(path, {"OPSRELAY_SMTP__HOTS": "x"}), path, "smtp.hots", "unknown key")


# -- password_file -------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["s3cret-pw\n", "s3cret-pw\r\n", "s3cret-pw"])
def test_password_file_trailing_newline_is_stripped(tmp_path: Path, content: str) -> None:
    secret = tmp_path / "pw"
    secret.write_text(content, encoding="utf-8")
    path = write(tmp_path / "c.toml", f'[smtp]\nusername = "u"\npassword_file = "{secret}"\n')
    assert load_config(path, env={}).smtp.secret == "s3cret-pw"


def test_password_file_keeps_inner_whitespace(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_bytes(b" two words \n")
    path = write(tmp_path / "c.toml", f'[smtp]\npassword_file = "{secret}"\n')
    assert load_config(path, env={}).smtp.secret == " two words "


def test_missing_password_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[smtp]\npassword_file = "/nonexistent/opsrelay-pw"\n')
    assert_one_line(config_error(path), path, "smtp", "password_file '/nonexistent/opsrelay-pw' cannot be read")


def test_unreadable_password_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file, even by root (chmod 000 would not stop root).
    directory = tmp_path / "pwdir"
    directory.mkdir()
    path = write(tmp_path / "c.toml", f'[smtp]\npassword_file = "{directory}"\n')
    assert_one_line(config_error(path), path, "smtp", "cannot be read")


def test_password_and_password_file_together(tmp_path: Path) -> None:
    secret = write(tmp_path / "pw", "x\n")
    path = write(tmp_path / "c.toml", f'[smtp]\npassword = "y"\npassword_file = "{secret}"\n')
    assert_one_line(config_error(path), path, "smtp", "either password or password_file")


# -- one-line errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[smtp]\nhots = "x"\n', "smtp.hots", "unknown key"),
        ('[brokr]\nurl = "x"\n', "brokr", "unknown key"),
        (SUBSCRIPTION + 'progams = ["x"]\n', "progams", "unknown key"),
        ('[smtp]\nport = "abc"\n', "smtp.port", "integer"),
        ("[smtp]\nport = 70000\n", "smtp.port", "65535"),
        ('[smtp]\nsecurity = "ssl"\n', "smtp.security", "starttls"),
        ('[retry]\nmax_attempts = "many"\n', "retry.max_attempts", "integer"),
        ('[[subscriptions]]\nname = "a"\nto = "oncall@example.com"\n', "to", "tuple"),
        ('[[subscriptions]]\nname = "a"\n', "to", "required"),
        ('[[subscriptions]]\nname = "a"\nto = []\n', "to", "at least 1"),
        ('[[subscriptions]]\nname = "a"\nto = ["oncall"]\n', "to", "'oncall' is not a mail address"),
        ('[[subscriptions]]\nname = "a"\nto = ["Ops <ops@example.com>"]\n', "to", "not a mail address"),
        ('[[subscriptions]]\nname = "a"\nto = ["a@example.com, b@example.com"]\n', "to", "not a mail address"),
        ('[[subscriptions]]\nname = "a"\nto = ["a@example.com\\r\\nBcc: x@evil.test"]\n', "to", "not a mail address"),
        ('[aliases]\nroot = "nobody"\n', "aliases.root", "not a mail address"),
        (SUBSCRIPTION + 'states = ["FATAL", "CRASHED"]\n', "states", "unknown state 'CRASHED'"),
        ('[[subscriptions]]\nname = "bad name"\nto = ["a@example.com"]\n', "name", "letters, digits"),
        (SUBSCRIPTION + SUBSCRIPTION, "subscriptions", "'crashes' is used twice"),
        ('[broker]\nurl = "redis://localhost/"\n', "broker.url", "amqp://"),
        ('[broker]\nurl = "sqlite:///relative/queue.db"\n', "broker.url", "absolute path"),
        ('[broker]\nprefix = "ops.relay"\n', "broker.prefix", "letters, digits"),
        ('[smtp]\ntimeout = "5 minutes"\n', "smtp.timeout", "'5 minutes' is not a duration"),
        ('[retry]\nbackoff = []\n', "retry.backoff", "at least 1"),
        ('[retry]\nbackoff = ["0s"]\n', "retry.backoff", "at least 1ms"),
        ('host = ""\n', "host", "at least 1"),
    ],
)
def test_invalid_config_is_one_line_naming_file_key_problem(tmp_path: Path, text: str, key: str,
                                                            problem: str) -> None:
    path = write(tmp_path / "opsrelay.toml", text)
    err = config_error(path)
    assert_one_line(err, path, key, problem)
    assert err.path == str(path)
    assert err.key is not None and key.split(".")[0] in err.key


def test_several_problems_are_counted_on_the_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[smtp]\nport = "abc"\nhots = 1\n[broker]\nurl = "x"\n')
    assert_one_line(config_error(path), path, "", r"\(and 2 more problems\)")


def test_pattern_longer_than_a_shortstr_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", SUBSCRIPTION + f'patterns = ["proc.{"a" * 260}"]\n')
    assert_one_line(config_error(path), path, "patterns", "255 bytes")


# -- clear-text AUTH -----------------------------------------------------------------------


def _clear_text(host: str) -> str:
    return f'[smtp]\nhost = "{host}"\nsecurity = "none"\nusername = "u"\npassword = "p"\n'


@pytest.mark.parametrize("host", ["smtp.example.com", "10.0.0.5", "192.0.2.1"])
def test_clear_text_auth_to_remote_host_is_refused(tmp_path: Path, host: str) -> None:
    path = write(tmp_path / "c.toml", _clear_text(host))
    assert_one_line(config_error(path), path, "smtp", "clear text")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_clear_text_auth_to_loopback_is_allowed(tmp_path: Path, host: str) -> None:
    config = load_config(write(tmp_path / "c.toml", _clear_text(host)), env={})
    assert config.smtp.security is Security.NONE
    assert config.smtp.effective_port == 25


def test_tls_auth_to_remote_host_is_fine(tmp_path: Path) -> None:
    text = '[smtp]\nhost = "smtp.example.com"\nsecurity = "tls"\nusername = "u"\npassword = "p"\n'
    config = load_config(write(tmp_path / "c.toml", text), env={})
    assert config.smtp.effective_port == 465


# -- secrets -------------------------------------------------------------------------------


def test_no_secret_in_repr_or_str(tmp_path: Path) -> None:
    secret = write(tmp_path / "pw", "pw-from-file-5d1c\n")
    path = write(tmp_path / "c.toml", f'[smtp]\nusername = "u"\npassword_file = "{secret}"\n')
    config = load_config(path, env={})
    assert config.smtp.secret == "pw-from-file-5d1c"
    for text in (repr(config), str(config), repr(config.smtp), str(config.smtp)):
        assert "pw-from-file-5d1c" not in text
    config = load_config(write(tmp_path / "d.toml", ""), env={"OPSRELAY_SMTP__PASSWORD": "pw-from-env-77ab"})
    for text in (repr(config), str(config), repr(config.smtp), str(config.smtp)):
        assert "pw-from-env-77ab" not in text
        assert "**********" in text


def test_broker_password_not_in_repr_or_str(tmp_path: Path) -> None:
    """The broker URL carries a password too (amqps://user:pw@host/): it is a secret like the SMTP one."""
    path = write(tmp_path / "c.toml", '[broker]\nurl = "amqps://opsrelay:broker-pw-93f2@rabbit.example.com/"\n')
    config = load_config(path, env={})
    assert config.broker.url == "amqps://opsrelay:broker-pw-93f2@rabbit.example.com/"
    for text in (repr(config), str(config), repr(config.broker)):
        assert "broker-pw-93f2" not in text, text


def test_errors_do_not_leak_the_password(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[smtp]\npassword = "pw-in-error-0c4e"\nport = "x"\nhots = 1\n')
    assert "pw-in-error-0c4e" not in str(config_error(path))


# -- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0), ("1d", 86400.0), ("1.5h", 5400.0),
     (" 10 s ", 10.0), ("45", 45.0), (7, 7.0), (2.5, 2.5), (0, 0.0)],
)
def test_parse_duration(value: str | float, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["", "5 minutes", "2M", "-1s", "1e3", "s", "1ms2", "10x", -1, -0.5, True, float("nan"), float("inf")]
)
def test_bad_durations(value: str | float) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize("seconds", [0.5, 30.0, 120.0, 3600.0, 86400.0, 90.0])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_durations_in_config(tmp_path: Path) -> None:
    text = ('[broker]\nconfirm_timeout = 2\n[smtp]\ntimeout = "500ms"\n'
            '[retry]\nbackoff = ["30s", "2m", 0.25, "1h"]\n')
    config = load_config(write(tmp_path / "c.toml", text), env={})
    assert config.broker.confirm_timeout == 2.0
    assert config.smtp.timeout == 0.5
    assert config.retry.backoff == (30.0, 120.0, 0.25, 3600.0)


@pytest.mark.parametrize(
    ("text", "key"),
    [("[retry]\nbackoff = [nan]\n", "retry.backoff"), ("[smtp]\ntimeout = inf\n", "smtp.timeout"),
     ("[broker]\nconfirm_timeout = nan\n", "broker.confirm_timeout"), ("[smtp]\ntimeout = -3\n", "smtp.timeout")],
)
def test_non_finite_or_negative_durations_in_config_are_refused(tmp_path: Path, text: str, key: str) -> None:
    """TOML has nan and inf: an endless timeout or a nan backoff step must fail at start, not in the relay."""
    path = write(tmp_path / "c.toml", text)
    assert_one_line(config_error(path), path, key, "duration")


# -- the shipped example -------------------------------------------------------------------


def test_shipped_config_validates() -> None:
    config = load_config(SHIPPED, env={"OPSRELAY_SMTP__PASSWORD": "shipped-pw"})
    assert isinstance(config, Config)
    assert config.smtp.host == "smtp.example.com"
    assert config.smtp.security is Security.STARTTLS
    assert config.smtp.secret == "shipped-pw"
    assert config.smtp.from_ == "alerts@example.com"
    assert config.broker.confirm_timeout == 2.0
    assert config.retry.backoff == (30.0, 120.0, 600.0, 1800.0, 3600.0)
    (crashes,) = config.subscriptions
    assert crashes.name == "crashes"
    assert crashes.to == ("oncall@example.com",)
    # send_resolved binds RUNNING too, for the recovery notices.
    assert crashes.bindings() == ("proc.*.*.*.EXITED", "proc.*.*.*.FATAL", "proc.*.*.*.RUNNING")
    # The recommended mail settings are shown there, while the defaults stay one mail per event.
    assert (crashes.group_wait, crashes.group_interval, crashes.max_mails_per_hour) == (30.0, 300.0, 6)
    assert crashes.send_resolved and crashes.stateful
    assert not Subscription(name="plain", to=("a@example.com",)).stateful
    assert config.listener.log_tail_bytes == 4096 and config.listener.fetch_timeout == 1.0


def test_shipped_config_without_password_names_the_missing_file() -> None:
    if Path("/etc/opsrelay/smtp-password").exists():
        pytest.skip("this machine has the password file")
    err = config_error(SHIPPED)
    assert_one_line(err, SHIPPED, "smtp", "/etc/opsrelay/smtp-password")


@pytest.mark.parametrize(("name", "problem"), [
    ("X-Opsrelay-Kind", "set by opsrelay"), ("Bcc", "set by opsrelay"),
    ("X Team", "plain token"), ("X-Team:", "plain token"), ("", "plain token"),
])
def test_extra_header_names_are_plain_and_never_ours(tmp_path: Path, name: str, problem: str) -> None:
    path = write(tmp_path / "c.toml", SUBSCRIPTION + f"headers = {{ {json.dumps(name)} = \"x\" }}\n")
    assert_one_line(config_error(path), path, "subscriptions.0.headers", problem)
