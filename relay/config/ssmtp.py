"""ssmtp's ``ssmtp.conf`` and ``revaliases``, read so that a host moves over by pointing at them.

``smtp.ssmtp_conf = "/etc/ssmtp/ssmtp.conf"`` fills every key the opsrelay config leaves unset
(the environment and opsrelay.toml always win), and ``revaliases`` is read from the same folder:

============================  ==============================================================
ssmtp                         opsrelay
============================  ==============================================================
``mailhub=host[:port]``       ``smtp.host``, ``smtp.port`` (ssmtp's default port is 25)
``RemotePort``                ``smtp.port``
``UseSTARTTLS=YES``           ``smtp.security = "starttls"``
``UseTLS=YES``                ``smtp.security = "tls"`` (neither: ``"none"`` only to a loopback
                             mailhub; otherwise STARTTLS stays required)
``AuthUser``, ``AuthPass``    ``smtp.username``, ``smtp.password``
``TLS_CA_File``               ``smtp.ca_file`` (certificates are verified, unlike ssmtp)
``hostname``                  ``smtp.helo``; and ``sendmail.domain`` without ``rewriteDomain``
``rewriteDomain``             ``sendmail.domain``: local names become ``name@domain``
``root``                      ``aliases."*"``: where mail to local names goes
``FromLineOverride``          ``sendmail.from_line_override`` (absent: NO, as in ssmtp)
``revaliases``                ``[sendmail.senders]``: the envelope sender per local user
============================  ==============================================================

Read as ssmtp reads it: keys are case-insensitive, ``#`` starts a comment anywhere on a line
(so no working ssmtp.conf has one in a value), booleans are ``YES`` or anything else. Unlike
ssmtp, spaces around ``=`` are allowed. What cannot be carried over is said in the notes
(``opsrelay check`` prints them): ``AuthMethod`` (the strongest mechanism the server offers
is used), ``TLS_CA_Dir`` (the system's trust store is used), client certificates, a
per-user mailhub in revaliases.

Standard library only: the sendmail fast path reads this too.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

__all__ = ["SsmtpConf", "SsmtpError", "load", "merge_into", "parse_conf", "parse_revaliases"]

SSMTP_DEFAULT_PORT = 25
# The system trust store: already trusted by every TLS context we make.
_SYSTEM_CA_DIRS = ("/etc/ssl/certs", "/etc/ssl/certs/")


class SsmtpError(ValueError):
    """ssmtp.conf cannot be read; the text is one line."""


class SsmtpConf:
    """The keys of one ssmtp.conf (None: not set) and its revaliases."""

    __slots__ = ("auth_method", "auth_pass", "auth_user", "from_line_override", "hostname", "ignored",
                 "mailhub", "port", "revaliases", "rewrite_domain", "root", "tls_ca_dir", "tls_ca_file",
                 "use_starttls", "use_tls")

    def __init__(self) -> None:
        self.root: str | None = None
        self.mailhub: str | None = None
        self.port: int | None = None
        self.rewrite_domain: str | None = None
        self.hostname: str | None = None
        self.from_line_override: bool | None = None
        self.use_tls = False
        self.use_starttls = False
        self.auth_user: str | None = None
        self.auth_pass: str | None = None
        self.auth_method: str | None = None
        self.tls_ca_file: str | None = None
        self.tls_ca_dir: str | None = None
        # local user -> (sender address, mailhub or None, port or None)
        self.revaliases: dict[str, tuple[str, str | None, int | None]] = {}
        self.ignored: list[str] = []

    @property
    def security(self) -> str:
        # ssmtp: UseSTARTTLS=YES implies UseTLS; UseTLS alone is TLS from the first byte.
        if self.use_starttls:
            return "starttls"
        return "tls" if self.use_tls else "none"


def _yes(value: str) -> bool:
    return value.lower() == "yes"


def _port(value: str, where: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise SsmtpError(f"{where}: {value!r} is not a port number")
    return int(value)


def parse_conf(text: str, where: str = "ssmtp.conf") -> SsmtpConf:
    """Parse ssmtp.conf text; SsmtpError names the line of a bad port."""
    conf = SsmtpConf()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0]
        key, eq, value = line.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or not key:
            continue
        here = f"{where} line {number}"
        if key == "root":
            conf.root = value
        elif key == "mailhub":
            host, colon, port = value.partition(":")
            conf.mailhub = host
            if colon:
                conf.port = _port(port, here)
        elif key == "remoteport":
            conf.port = _port(value, here)
        elif key == "rewritedomain":
            # ssmtp takes the part after the last @ of a mistaken "user@domain".
            conf.rewrite_domain = value.rpartition("@")[2] or None
        elif key == "hostname":
            conf.hostname = value or None
        elif key == "fromlineoverride":
            conf.from_line_override = _yes(value)
        elif key == "usetls":
            conf.use_tls = _yes(value)
            conf.use_starttls = conf.use_starttls and conf.use_tls
        elif key == "usestarttls":
            conf.use_starttls = _yes(value)
            conf.use_tls = conf.use_tls or conf.use_starttls
        elif key == "authuser":
            conf.auth_user = value
        elif key == "authpass":
            conf.auth_pass = value
        elif key == "authmethod":
            conf.auth_method = value or None
        elif key == "tls_ca_file":
            conf.tls_ca_file = value or None
        elif key == "tls_ca_dir":
            conf.tls_ca_dir = value or None
        else:
            conf.ignored.append(raw.split("=", 1)[0].strip())
    return conf


def parse_revaliases(text: str, where: str = "revaliases") -> dict[str, tuple[str, str | None, int | None]]:
    """``local_account:outgoing_address[:mailhub[:port]]`` lines, as ssmtp reads them."""
    entries: dict[str, tuple[str, str | None, int | None]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if ":" not in line:
            continue
        parts = [p.strip() for p in line.split(":")]
        user, address = parts[0], parts[1]
        if not user or not address:
            continue
        hub = parts[2] if len(parts) > 2 and parts[2] else None
        port = _port(parts[3], f"{where} line {number}") if len(parts) > 3 and parts[3] else None
        entries.setdefault(user, (address, hub, port))  # ssmtp stops at the first match
    return entries


def load(path: str) -> SsmtpConf:
    """Read ssmtp.conf and, when present, ``revaliases`` beside it."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            conf = parse_conf(handle.read(), path)
    except OSError as exc:
        raise SsmtpError(f"cannot read {path}: {exc.strerror or exc}") from None
    revaliases = os.path.join(os.path.dirname(path), "revaliases")
    try:
        with open(revaliases, encoding="utf-8", errors="replace") as handle:
            conf.revaliases = parse_revaliases(handle.read(), revaliases)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SsmtpError(f"cannot read {revaliases}: {exc.strerror or exc}") from None
    return conf


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    section = data.get(name)
    if section is None:
        section = data[name] = {}
    if not isinstance(section, dict):
        raise SsmtpError(f"[{name}] is not a table")
    return section


def merge_into(data: Mapping[str, Any], conf: SsmtpConf) -> tuple[dict[str, Any], list[str]]:
    """The config ``data`` (TOML merged with the environment) with ssmtp's values under it.

    Returns the new data and one note per key taken, ignored or overridden, for ``opsrelay check``.
    """
    out: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    smtp, aliases, sendmail = _section(out, "smtp"), _section(out, "aliases"), _section(out, "sendmail")
    notes: list[str] = []

    def take(section: dict[str, Any], key: str, value: object, ssmtp_key: str, shown: object = None) -> None:
        label = f"{'smtp' if section is smtp else 'sendmail' if section is sendmail else 'aliases'}.{key}"
        if key in section:
            notes.append(f"{ssmtp_key}: not used, {label} is set in opsrelay.toml or the environment")
            return
        section[key] = value
        notes.append(f"{ssmtp_key} -> {label} = {shown if shown is not None else repr(value)}")

    if conf.mailhub:
        take(smtp, "host", conf.mailhub, "mailhub")
        if "host" not in data.get("smtp", {}) and "port" not in smtp:
            take(smtp, "port", conf.port or SSMTP_DEFAULT_PORT, "mailhub port")
    elif conf.port is not None:
        take(smtp, "port", conf.port, "RemotePort")
    relay_host = str(smtp.get("host", ""))
    if conf.security != "none" or relay_host in ("localhost", "127.0.0.1", "::1"):
        take(smtp, "security", conf.security, "UseTLS/UseSTARTTLS")
    else:
        # ssmtp sent mail (and AuthPass) in clear text; we never do to another host.
        notes.append("UseTLS/UseSTARTTLS absent: ssmtp used clear text; opsrelay keeps "
                     "smtp.security = 'starttls' ('none' is only for a relay on this host)")
    if conf.auth_user:
        take(smtp, "username", conf.auth_user, "AuthUser")
    if conf.auth_pass is not None and conf.auth_user:
        if "password" in smtp or "password_file" in smtp:
            notes.append("AuthPass: not used, the password is set in opsrelay.toml or the environment")
        else:
            take(smtp, "password", conf.auth_pass, "AuthPass", shown="******")
    if conf.auth_method:
        notes.append(f"AuthMethod={conf.auth_method}: not needed, the strongest mechanism the server "
                     "offers over TLS is used")
    if conf.tls_ca_file:
        take(smtp, "ca_file", conf.tls_ca_file, "TLS_CA_File")
    if conf.tls_ca_dir:
        if conf.tls_ca_dir in _SYSTEM_CA_DIRS:
            notes.append(f"TLS_CA_Dir={conf.tls_ca_dir}: the system trust store, trusted already")
        else:
            notes.append(f"TLS_CA_Dir={conf.tls_ca_dir}: not used; put the CA in smtp.ca_file "
                         "(the system trust store is always used)")
    if conf.hostname:
        take(smtp, "helo", conf.hostname, "hostname")
    domain = conf.rewrite_domain or conf.hostname
    if domain:
        take(sendmail, "domain", domain, "rewriteDomain" if conf.rewrite_domain else "hostname")
    take(sendmail, "from_line_override", bool(conf.from_line_override),
         "FromLineOverride" + ("" if conf.from_line_override is not None else " (absent = NO)"))
    if conf.root:
        # ssmtp sent mail for system accounts to root=; here every local name without an alias.
        root = conf.root if "@" in conf.root or not domain else f"{conf.root}@{domain}"
        take(aliases, "*", root, "root")
    senders = sendmail.get("senders")
    senders = dict(senders) if isinstance(senders, dict) else {}
    for user, (address, hub, port) in conf.revaliases.items():
        if user in senders:
            notes.append(f"revaliases {user}: not used, sendmail.senders.{user} is set")
            continue
        if "@" not in address and domain:
            address = f"{address}@{domain}"  # ssmtp's append_domain
        senders[user] = address
        notes.append(f"revaliases {user} -> sendmail.senders.{user} = {address!r}")
        if hub and (hub != smtp.get("host") or (port or SSMTP_DEFAULT_PORT) != smtp.get("port")):
            notes.append(f"revaliases {user}: mailhub {hub}:{port or SSMTP_DEFAULT_PORT} not used, "
                         f"all mail goes through smtp.host")
    if senders:
        sendmail["senders"] = senders
    for key in conf.ignored:
        notes.append(f"{key}: not supported, ignored")
    return out, notes
