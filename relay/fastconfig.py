"""The keys ``opsrelay-sendmail`` needs, read without pydantic (whose import alone costs more
than a whole submission).

Same file search, same environment overrides (``OPSRELAY_SENDMAIL__MODE=direct``), same
ssmtp.conf merge (:func:`relay.ssmtp.merge_into`), same defaults and one-line errors as
:func:`relay.config.load_config` for these keys; a test compares the two readers. Keys this
reader does not use are left for the relay to validate: a submission is never refused over
a subscription's typo.
"""

from __future__ import annotations

import os

from relay.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

__all__ = [
    "DEFAULT_MAX_SIZE",
    "SEARCH_PATHS",
    "FastConfig",
    "cache_dir",
    "check_address",
    "default_queue_url",
    "env_overrides",
    "find_config",
    "layered",
    "load",
    "merge",
    "parse_size",
]

ENV_PREFIX = "OPSRELAY_"
SEARCH_PATHS = ("./opsrelay.toml", "~/.config/opsrelay/opsrelay.toml", "/etc/opsrelay/opsrelay.toml")
# 25 MB as mail providers count it (10^6): a "26 MB" attachment is over it in either unit.
DEFAULT_MAX_SIZE = 25_000_000
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_CACHE_VERSION = 1
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_DOMAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-")
# pydantic's lax bool strings, so an environment value reads the same in both readers.
_TRUE = frozenset(("1", "on", "t", "true", "y", "yes"))
_FALSE = frozenset(("0", "off", "f", "false", "n", "no"))
_SENDMAIL_KEYS = frozenset(("mode", "max_size", "domain", "from_line_override", "senders"))


def parse_size(value: object) -> int:
    """Bytes from ``25000000``, ``"25MB"`` (10^6), ``"25MiB"`` (2^20), ``"512K"``; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string like '25MB'")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        number = text.rstrip("kmgib ")
        unit = text[len(number):].strip().removesuffix("b")
        digits = number.replace(".", "", 1)
        if number and digits.isascii() and digits.isdigit() and unit in _SIZE_UNITS:
            return int(float(number) * _SIZE_UNITS[unit])
    raise ValueError(f"{value!r} is not a size (use e.g. 25000000, '25MB', '10MiB', '512KB')")


def _duration(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < float("inf"):
        return float(value)
    from relay.durations import parse_duration  # imports re: only for a string like "750ms"

    return parse_duration(value)  # type: ignore[arg-type]


def default_queue_url() -> str:
    """As relay.config: root /var/lib/opsrelay/queue.db; anyone else $XDG_STATE_HOME/opsrelay/queue.db."""
    if os.geteuid() == 0:
        return "sqlite:////var/lib/opsrelay/queue.db"
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return f"sqlite:///{os.path.join(os.path.abspath(state), 'opsrelay', 'queue.db')}"


def find_config(env: Mapping[str, str]) -> str | None:
    if env.get("OPSRELAY_CONFIG"):
        return env["OPSRELAY_CONFIG"]
    for candidate in SEARCH_PATHS:
        path = os.path.expanduser(candidate)
        if os.path.isfile(path):
            return path
    return None


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """``OPSRELAY_SMTP__PASSWORD=x`` -> ``{"smtp": {"password": "x"}}``; JSON lists/objects are parsed."""
    tree: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == "OPSRELAY_CONFIG" or name.startswith("OPSRELAY_TEST_"):
            continue
        keys = name[len(ENV_PREFIX):].lower().split("__")
        value: Any = raw
        if raw[:1] in "[{":
            import json

            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                break
        else:
            node[keys[-1]] = value
    return tree


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, tables merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class FastConfig:
    """The sendmail-relevant part of the config, validated as relay.config validates it."""

    __slots__ = ("aliases", "busy_timeout", "domain", "from_line_override", "host", "max_size", "mode", "path",
                 "prefix", "senders", "smtp_from", "url")

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        self.path = path
        broker, smtp, sendmail = (_table(data, name, path) for name in ("broker", "smtp", "sendmail"))
        self.host: str = _check(path, "host", data.get("host", os.uname().nodename.split(".")[0]), _text)
        self.url: str = _check(path, "broker.url", broker.get("url", default_queue_url()), _url)
        self.prefix: str = _check(path, "broker.prefix", broker.get("prefix", "opsrelay"), _name)
        self.busy_timeout: float = _check(path, "broker.confirm_timeout", broker.get("confirm_timeout", 2.0),
                                          _duration)
        self.smtp_from: str = _check(path, "smtp.from", smtp.get("from", ""), _sender_or_empty)
        self.aliases: dict[str, str] = _check(path, "aliases", _table(data, "aliases", path), _addresses)
        unknown = sorted(set(sendmail) - _SENDMAIL_KEYS)
        if unknown:
            raise ConfigError("unknown key", path=path, key=f"sendmail.{unknown[0]}")
        self.mode: str = _check(path, "sendmail.mode", sendmail.get("mode", "queue"), _mode)
        self.max_size: int = _check(path, "sendmail.max_size", sendmail.get("max_size", DEFAULT_MAX_SIZE), _size)
        self.domain: str = _check(path, "sendmail.domain", sendmail.get("domain", ""), _domain_or_empty) or self.host
        self.from_line_override: bool = _check(path, "sendmail.from_line_override",
                                               sendmail.get("from_line_override", True), _bool)
        self.senders: dict[str, str] = _check(path, "sendmail.senders", sendmail.get("senders", {}), _addresses)


def _table(data: Mapping[str, Any], name: str, path: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError("must be a table", path=path, key=name)
    return value


def _check(path: str, key: str, value: object, check: Any) -> Any:
    try:
        return check(value)
    except ValueError as exc:
        raise ConfigError(str(exc), path=path, key=key) from None


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _text_or_empty(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _name(value: object) -> str:
    if not isinstance(value, str) or not value or not set(value) <= _NAME_CHARS:
        raise ValueError("must be letters, digits, '_' or '-'")
    return value


def _url(value: object) -> str:
    url = _text(value)
    scheme = url.partition(":")[0].lower()
    if scheme not in ("amqp", "amqps", "sqlite"):
        raise ValueError("must start with amqp://, amqps:// or sqlite:/// (then an absolute path)")
    if scheme == "sqlite" and not url.startswith("sqlite:////"):
        raise ValueError("a sqlite URL is sqlite:/// then an absolute path, e.g. sqlite:////var/lib/opsrelay/queue.db")
    return url


def check_address(value: str) -> str:
    """A bare address: it goes into headers and SMTP commands, so no line breaks, spaces or lists."""
    if "@" not in value or any(c in value for c in "\r\n <>,"):
        raise ValueError(f"{value!r} is not a mail address like oncall@example.com")
    return value


def _sender_or_empty(value: object) -> str:
    text = _text_or_empty(value)
    return check_address(text) if text else text


def _domain_or_empty(value: object) -> str:
    text = _text_or_empty(value)
    if not set(text) <= _DOMAIN_CHARS:
        raise ValueError(f"{text!r} is not a domain name")
    return text


def _addresses(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError("must be a table of name = address")
    for name, address in value.items():
        if not isinstance(address, str):
            raise ValueError(f"{name}: {address!r} is not a mail address like oncall@example.com")
        try:
            check_address(address)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return dict(value)


def _mode(value: object) -> str:
    if value not in ("queue", "direct"):
        raise ValueError("must be 'queue' or 'direct'")
    return str(value)


def _size(value: object) -> int:
    size = parse_size(value)
    if size < 1:
        raise ValueError("must be at least 1 byte")
    return size


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError("must be true or false")


def cache_dir(env: Mapping[str, str]) -> str:
    """``$XDG_CACHE_HOME/opsrelay`` (``~/.cache/opsrelay``): the parsed config, per user."""
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "opsrelay")


def _private(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _cached(folder: str, name: str, key: tuple[object, ...]) -> dict[str, Any] | None:
    import marshal

    try:
        if not _private(os.lstat(folder)):
            return None
        fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as handle:
            if not _private(os.fstat(handle.fileno())):
                return None
            # S302: the file is the user's own and nobody else can write it or its folder;
            # the data is only compared and read, never executed.
            version, found, data = marshal.load(handle)  # noqa: S302
    except (OSError, EOFError, ValueError, TypeError):
        return None
    return data if version == _CACHE_VERSION and found == key and isinstance(data, dict) else None


def _store(folder: str, name: str, key: tuple[object, ...], data: dict[str, Any]) -> None:
    import marshal

    try:
        blob = marshal.dumps((_CACHE_VERSION, key, data))  # type: ignore[arg-type]  # TOML values only
    except ValueError:
        return  # a TOML date or time: marshal cannot hold it, so this file is parsed every time
    tmp = os.path.join(folder, f".{name}.{os.getpid()}")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if not _private(os.lstat(folder)):
            return
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(blob)
        os.replace(tmp, os.path.join(folder, name))
    except OSError:
        try:  # noqa: SIM105 - contextlib is not imported on this path
            os.unlink(tmp)
        except OSError:
            pass


def read_toml(path: str, env: Mapping[str, str]) -> dict[str, Any]:
    """The parsed file; ConfigError (one line) when it cannot be read or is not TOML.

    Importing tomllib costs 15-30 ms, more than the rest of a submission; so the parsed table is
    kept in the user's cache (marshal, 0600, in a folder only they can write) and used while the
    file's device, inode, size, mtime and ctime are unchanged. Anything odd about the cache
    (missing, foreign owner, writable by others, stale, corrupt) means: parse the file.
    """
    import binascii

    try:
        st = os.stat(path)
        key: tuple[object, ...] = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                   st.st_ctime_ns)
    except OSError:
        key = ()
    folder = cache_dir(env)
    name = f"config-{binascii.crc32(os.fsencode(os.path.abspath(path))):08x}.marshal"
    if key and (data := _cached(folder, name, key)) is not None:
        return data
    import tomllib

    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("no such file", path=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", path=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=path) from None
    # The queue path never needs the SMTP password (direct mode reads the full config), so
    # it is dropped here: no second copy of the secret in a cache file.
    smtp = data.get("smtp")
    if isinstance(smtp, dict):
        data["smtp"] = {k: v for k, v in smtp.items() if k != "password"}
    if key:
        _store(folder, name, key, data)
    return data


def load(env: Mapping[str, str] | None = None) -> FastConfig:
    """Find, read and merge as relay.config.load_config does; ConfigError (one line) otherwise."""
    env = os.environ if env is None else env
    found = find_config(env)
    if found is None:
        # No config anywhere means no relay reads any queue: queuing would strand the mail.
        raise ConfigError("no opsrelay.toml found ($OPSRELAY_CONFIG, ./opsrelay.toml, "
                          "~/.config/opsrelay/opsrelay.toml, /etc/opsrelay/opsrelay.toml)")
    data, _ = layered(read_toml(found, env), env, found)
    return FastConfig(data, found)


def layered(data: dict[str, Any], env: Mapping[str, str], where: str) -> tuple[dict[str, Any], list[str]]:
    """The file's table with the environment over it and smtp.ssmtp_conf under both; and the ssmtp notes.

    Both config readers (this one and relay.config) go through here, so they cannot disagree.
    """
    overrides = env_overrides(env)
    if "password" in overrides.get("smtp", {}) and isinstance(data.get("smtp"), dict):
        # The environment's password replaces the file's password source, whichever it was.
        data["smtp"] = {k: v for k, v in data["smtp"].items() if k != "password_file"}
    data = merge(data, overrides)
    notes: list[str] = []
    smtp = data.get("smtp")
    if isinstance(smtp, dict) and smtp.get("ssmtp_conf"):
        from relay import ssmtp

        try:
            data, notes = ssmtp.merge_into(data, ssmtp.load(str(smtp["ssmtp_conf"])))
        except ssmtp.SsmtpError as exc:
            raise ConfigError(str(exc), path=where, key="smtp.ssmtp_conf") from None
    return data, notes
