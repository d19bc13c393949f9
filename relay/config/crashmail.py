"""superlance crashmail's flags as an implicit subscription, so ``opsrelay listen`` is a drop-in (pure).

``command=crashmail -a -m ops@example.com`` becomes ``command=opsrelay listen -a -m ops@example.com``.
What crashmail mails, and how each flag maps:

* one mail per ``PROCESS_STATE_EXITED`` whose ``expected`` is 0; every other event and every
  expected exit is answered OK and forgotten: ``states = ["EXITED"]``, ``unexpected_only``;
* ``-p NAME`` (repeatable) watches process NAME in any group, ``-p GROUP:NAME`` that process of
  that group (crashmail's usage text). Names are literal, as there: a ``*`` in one is not a glob;
* ``-a`` watches every process and overrides ``-p``. superlance 2.0.0 implements neither ``-p``
  nor ``-a`` and mails every unexpected exit (Supervisor/superlance#18, open): we follow its
  documentation for ``-p`` and its code when neither flag is given (every process);
* ``-m ADDR`` is where mail goes; crashmail hands it to ``sendmail -t`` as the To: header, so a
  comma-separated list and a local name (``root``, resolved through ``[aliases]`` as
  ``opsrelay-sendmail`` does) work here too. Without ``-m`` crashmail sends nothing: neither do we;
* ``-o TEXT`` prefixes the subject: ``TEXT: NAME crashed at TIME``;
* ``-s COMMAND`` is not run (the relay delivers); when it is a sendmail command line with
  ``-f ADDR`` or ``-r ADDR`` (crashmail's documented way to choose the sender), that address is the
  sender of these mails unless the config sets ``smtp.from``.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from relay.config.models import Config, Subscription
from relay.config.rules import check_address
from relay.contract.urls import is_sqlite
from relay.errors import ConfigError
from relay.sendmail.addresses import AddressError, parse_address_list, resolve_recipient
from relay.sendmail.args import UsageError, parse_argv

__all__ = [
    "NAME",
    "SUBJECT",
    "CrashmailFlags",
    "FlagError",
    "config_with_crashmail",
    "crashmail_subscription",
    "literal",
    "local_mta_env",
    "subscription_name",
]

NAME = "crashmail"
# crashmail's subject is " NAME crashed at TIME" (the process name, not group:name); the
# renderer puts subject_prefix and ": " before it, as crashmail does with -o.
SUBJECT = "{{ process }} crashed at {{ time }}"
# crashmail's default sendmail, whose local MTA opsrelay reaches over SMTP instead.
LOCAL_MTA = {"OPSRELAY_SMTP__HOST": "localhost", "OPSRELAY_SMTP__PORT": "25", "OPSRELAY_SMTP__SECURITY": "none"}
_NOT_NAME = re.compile(r"[^A-Za-z0-9_-]")


class FlagError(ValueError):
    """A crashmail flag that cannot be honoured: exit 64 (EX_USAGE) with this one line."""


def literal(name: str) -> str:
    """``name`` as an fnmatch pattern that matches only itself (crashmail compares names, no globs)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@dataclass(frozen=True, slots=True)
class CrashmailFlags:
    programs: tuple[str, ...] = ()
    any_program: bool = False
    email: str | None = None
    optional_header: str | None = None
    sendmail: str | None = None
    # Words after the options: crashmail's usage names a URL there, and getopt leaves them unread.
    ignored: tuple[str, ...] = ()

    @classmethod
    def parse(cls, *, programs: Sequence[str] = (), any_program: bool = False, email: str | None = None,
              optional_header: str | None = None, sendmail: str | None = None,
              ignored: Sequence[str] = ()) -> CrashmailFlags:
        """Check the values typer collected; FlagError for one that cannot mean anything."""
        for program in programs:
            group, sep, process = program.partition(":")
            if not (process if sep else group) or (sep and not group):
                raise FlagError(f"-p {program!r} names no process (use NAME or GROUP:NAME)")
        if email is not None and not email.strip():
            raise FlagError("-m needs a mail address")
        return cls(tuple(programs), any_program, email, optional_header, sendmail, tuple(ignored))

    @property
    def mails(self) -> bool:
        """Only ``-m`` makes crashmail send anything."""
        return self.email is not None

    @property
    def given(self) -> bool:
        return bool(self.programs or self.any_program or self.email is not None or self.optional_header is not None
                    or self.sendmail is not None or self.ignored)

    def notes(self) -> list[str]:
        """What the listener should say on stderr about flags it takes but does not act on."""
        notes = []
        if self.given and not self.mails:
            notes.append("crashmail flags without -m: no mail is sent (crashmail sends none either)")
        if self.mails and not (self.programs or self.any_program):
            notes.append("-m without -p or -a: every process is watched (as crashmail does)")
        if self.ignored:
            notes.append(f"ignored arguments {' '.join(self.ignored)!r} (crashmail does not read them either)")
        if self.sendmail is not None:
            sender = _minus_f(self.sendmail)
            kept = f"; its sender {sender} is kept unless smtp.from is set" if sender else ""
            notes.append(f"-s is not run: opsrelay delivers the mail itself{kept}")
        return notes

    def watched(self) -> tuple[str, ...]:
        """Subscription.programs: ``*`` for -a (or neither), else each -p matched literally."""
        if self.any_program or not self.programs:
            return ("*",)
        return tuple(dict.fromkeys(":".join(literal(part) for part in p.split(":", 1)) for p in self.programs))


def _minus_f(command: str) -> str | None:
    """The ``-f``/``-r`` sender of a sendmail command line; None when there is none or it is no sendmail."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if not words:
        return None
    try:
        return parse_argv(words[1:], os.path.basename(words[0])).sender or None
    except UsageError:
        return None


def subscription_name(config: Config) -> str:
    """``crashmail`` on the embedded queue; per host on a shared broker.

    The subscription only takes this host's events (crashmail hears one supervisord); on
    RabbitMQ every host's listener would otherwise bind and consume one shared queue, and
    a host's filter would drop another host's crash.
    """
    if is_sqlite(config.broker.url):
        return NAME
    return f"{NAME}-{_NOT_NAME.sub('-', config.host)}"


def _recipients(config: Config, email: str) -> tuple[str, ...]:
    domain = config.sendmail.domain or config.host
    try:
        if any(ord(c) < 32 or ord(c) == 127 for c in email):
            raise AddressError(f"{email!r} holds control characters")
        listed = parse_address_list(email)
        if not listed:
            raise AddressError(f"{email!r} holds no address")
        return tuple(dict.fromkeys(check_address(resolve_recipient(a, config.aliases, domain)) for a in listed))
    except ValueError as exc:  # AddressError included
        raise ConfigError(str(exc), key="-m/--email") from None


def crashmail_subscription(config: Config, flags: CrashmailFlags) -> Subscription | None:
    """The subscription crashmail's flags stand for; None without ``-m`` (nothing is mailed)."""
    if flags.email is None:
        return None
    return Subscription(
        name=subscription_name(config),
        to=_recipients(config, flags.email),
        programs=flags.watched(),
        hosts=(literal(config.host),),
        states=("EXITED",),
        unexpected_only=True,
        subject=SUBJECT,
        subject_prefix=flags.optional_header or "",
    )


def config_with_crashmail(config: Config, flags: CrashmailFlags) -> Config:
    """``config`` plus the implicit subscription (unchanged without ``-m``); ConfigError when it clashes."""
    sub = crashmail_subscription(config, flags)
    if sub is None:
        return config
    if any(s.name == sub.name for s in config.subscriptions):
        raise ConfigError(f"a subscription is named {sub.name!r}, the name crashmail's -m flags use; "
                          "rename it", path=config.source, key="subscriptions")
    update: dict[str, object] = {"subscriptions": (*config.subscriptions, sub)}
    sender = _minus_f(flags.sendmail) if flags.sendmail else None
    if sender and not config.smtp.from_:
        try:
            check_address(sender)
        except ValueError as exc:
            raise ConfigError(str(exc), key="-s/--sendmail_program -f") from None
        update["smtp"] = config.smtp.model_copy(update={"from_": sender})
    return config.model_copy(update=update)


def local_mta_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the host's MTA (localhost:25, no TLS: loopback only) as the smarthost.

    For ``-m`` with no config file at all: crashmail piped to the local sendmail. Any
    ``OPSRELAY_SMTP__HOST/PORT/SECURITY`` already set wins, all three together.
    """
    if any(key in env for key in LOCAL_MTA):
        return dict(env)
    return {**env, **LOCAL_MTA}

