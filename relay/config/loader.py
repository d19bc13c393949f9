"""The one config loader: where the file is, how it is read, and what lies over and under it.

Both views of the config go through :func:`read`: the pydantic models
(:mod:`relay.config.models`, for the relay and the CLI) and the sendmail fast path
(:mod:`relay.config.fast`). So the search path, the environment overrides
(``OPSRELAY_SMTP__PASSWORD=…``) and the ssmtp.conf merge are the same for both.
Standard library only, and cheap to import.
"""

from __future__ import annotations

import os

from relay.errors import ConfigError, ConfigUnreadable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

__all__ = ["ENV_PREFIX", "SEARCH_PATHS", "cache_dir", "env_overrides", "find_config", "layered", "merge", "read",
           "read_toml"]

ENV_PREFIX = "OPSRELAY_"
SEARCH_PATHS = ("./opsrelay.toml", "~/.config/opsrelay/opsrelay.toml", "/etc/opsrelay/opsrelay.toml")
_CACHE_VERSION = 1


def find_config(explicit: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """``--config``, then ``$OPSRELAY_CONFIG``, then the search path; None when nothing exists."""
    env = os.environ if env is None else env
    if explicit:
        return os.fspath(explicit)
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


def _parse(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            # Opened first: a user who may not read the file does not pay for tomllib (~12 ms).
            import tomllib

            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("no such file", path=path) from None
    except PermissionError as exc:
        raise ConfigUnreadable(f"cannot read: {exc.strerror or exc}", path=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", path=path) from None
    except ValueError as exc:  # tomllib.TOMLDecodeError
        raise ConfigError(f"not valid TOML: {exc}", path=path) from None


def read_toml(path: str, env: Mapping[str, str], *, cached: bool = False) -> dict[str, Any]:
    """The parsed file; ConfigError (one line) when it cannot be read or is not TOML.

    ``cached`` (the sendmail queue path): importing tomllib costs 15-30 ms, more than the rest
    of a submission; so the parsed table is kept in the user's cache (marshal, 0600, in a folder
    only they can write) and used while the file's device, inode, size, mtime and ctime are
    unchanged. Anything odd about the cache (missing, foreign owner, writable by others, stale,
    corrupt) means: parse the file. The cached table has no ``smtp.password``: the queue path
    never needs it, and a cache file must not be a second copy of the secret.
    """
    if not cached:
        return _parse(path)
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
    data = _parse(path)
    smtp = data.get("smtp")
    if isinstance(smtp, dict):
        data["smtp"] = {k: v for k, v in smtp.items() if k != "password"}
    if key:
        _store(folder, name, key, data)
    return data


def layered(data: dict[str, Any], env: Mapping[str, str], where: str) -> tuple[dict[str, Any], list[str]]:
    """The file's table with the environment over it and smtp.ssmtp_conf under both; and the ssmtp notes."""
    overrides = env_overrides(env)
    if "password" in overrides.get("smtp", {}) and isinstance(data.get("smtp"), dict):
        # The environment's password replaces the file's password source, whichever it was.
        data["smtp"] = {k: v for k, v in data["smtp"].items() if k != "password_file"}
    data = merge(data, overrides)
    notes: list[str] = []
    smtp = data.get("smtp")
    if isinstance(smtp, dict) and smtp.get("ssmtp_conf"):
        from relay.config import ssmtp

        try:
            data, notes = ssmtp.merge_into(data, ssmtp.load(str(smtp["ssmtp_conf"])))
        except ssmtp.SsmtpError as exc:
            raise ConfigError(str(exc), path=where, key="smtp.ssmtp_conf") from None
    return data, notes


def read(explicit: str | os.PathLike[str] | None, env: Mapping[str, str] | None, *,
         required: bool = False, cached: bool = False) -> tuple[str, dict[str, Any], list[str]]:
    """(where, table, ssmtp notes): the file found, merged with the environment and smtp.ssmtp_conf.

    Without a file the table is the environment's alone and ``where`` is ``(defaults)``, unless
    ``required``: then ConfigError (sendmail must not queue where no relay reads the queue).
    """
    env = os.environ if env is None else env
    found = find_config(explicit, env)
    if found is None:
        if required:
            raise ConfigError("no opsrelay.toml found ($OPSRELAY_CONFIG, ./opsrelay.toml, "
                              "~/.config/opsrelay/opsrelay.toml, /etc/opsrelay/opsrelay.toml)")
        data, notes = layered({}, env, "(defaults)")
        return "(defaults)", data, notes
    data, notes = layered(read_toml(found, env, cached=cached), env, found)
    return found, data, notes
