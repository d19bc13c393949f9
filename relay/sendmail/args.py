"""sendmail's command line, parsed purely: what real callers pass, and a refusal for the rest.

The option letters are sendmail 8's (its getopt string ``B:b:C:cd:eF:f:Gh:IiL:M:mN:nO:o:p:q:R:r:sTtV:vX:``),
so an option that takes a value takes it attached (``-fADDR``, ``-oi``) or as the next word
(``-f ADDR``), and flags cluster (``-ti``). As GNU getopt does, options may follow recipients
(``sendmail root -oi``); ``--`` ends them. Recipient words are kept as given (each may be
an address list, parsed by :mod:`relay.sendmail.addresses`).

Honoured: ``-t -i -oi -f -r -F -v -bm -bp`` (and ``mailq``). Accepted and ignored, because the
relay decides them or they change nothing here: ``-B`` (body type: 8-bit bytes are kept
whatever it says), ``-oe*`` (errors are the exit status), ``-od*`` (the relay always delivers
in the background; ``sendmail.mode = "direct"`` is the config's choice), every other ``-o*``
and ``-O``, ``-N -R -V -L -h -d -X -p -M -e -c -m -n -s -G -T``. Refused with exit 64, one
line each: daemon, SMTP-on-stdin, queue-run, alias and address-test modes, and ``-C`` (the
config is ``$OPSRELAY_CONFIG``).

Standard library only and no dataclasses/enum/typing import: this runs on every submission.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["LIST_QUEUE", "SEND", "Invocation", "UsageError", "parse_argv"]

SEND = "send"
LIST_QUEUE = "list-queue"

# Options that take a value (sendmail 8's getopt string); the others are flags.
_WITH_VALUE = frozenset("BbCdFfhLMNOopRrVX")
_FLAGS = frozenset("ceGIimnsTtv")

# -b modes other than m (deliver) and p (print the queue): what they are, for the refusal.
_MODES = {
    "a": "ARPANET mode",
    "d": "running as a daemon",
    "D": "running as a daemon",
    "h": "the host status database",
    "H": "the host status database",
    "i": "rebuilding aliases (aliases live in [aliases] of opsrelay.toml)",
    "P": "queue statistics",
    "s": "SMTP on standard input",
    "t": "address test mode",
    "v": "address verification",
}


class UsageError(ValueError):
    """The command line cannot be honoured: exit 64 (EX_USAGE) with this one line."""


class Invocation:
    """What one run was asked to do."""

    __slots__ = ("dot_ends", "from_headers", "full_name", "mode", "recipients", "sender", "verbose")

    def __init__(self, *, mode: str = SEND, recipients: tuple[str, ...] = (), from_headers: bool = False,
                 dot_ends: bool = True, sender: str | None = None, full_name: str | None = None,
                 verbose: bool = False) -> None:
        self.mode = mode
        self.recipients = recipients
        # -t: recipients also from To/Cc/Bcc, and Bcc removed from the copy sent.
        self.from_headers = from_headers
        # Without -i/-oi a line holding only "." ends the input, as sendmail reads it.
        self.dot_ends = dot_ends
        self.sender = sender
        self.full_name = full_name
        self.verbose = verbose

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Invocation):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, name) for name in self.__slots__))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Invocation({fields})"


def _mode(value: str) -> str:
    if value in ("m", ""):
        return SEND
    if value == "p":
        return LIST_QUEUE
    what = _MODES.get(value[:1], "this mode")
    raise UsageError(f"-b{value} ({what}) is not supported: opsrelay-sendmail only queues mail (-bm) "
                     "and lists the queue (-bp)")


def parse_argv(argv: Sequence[str], prog: str = "sendmail") -> Invocation:
    """Parse sendmail's arguments (without argv[0]); ``prog`` is the name it was called by.

    Raises :class:`UsageError` for anything that cannot be honoured.
    """
    if prog == "newaliases":
        raise UsageError("newaliases is not supported: aliases live in [aliases] of opsrelay.toml")
    mode = LIST_QUEUE if prog == "mailq" else SEND
    recipients: list[str] = []
    sender: str | None = None
    full_name: str | None = None
    from_headers = verbose = False
    dot_ends = True
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--":
            recipients.extend(words[i:])
            break
        if not word.startswith("-") or word == "-":
            recipients.append(word)
            continue
        if word.startswith("--"):
            raise UsageError(f"unknown option {word} (sendmail has no long options)")
        j = 1
        while j < len(word):
            letter = word[j]
            j += 1
            if letter in _FLAGS:
                if letter == "t":
                    from_headers = True
                elif letter == "i":
                    dot_ends = False
                elif letter == "v":
                    verbose = True
                elif letter == "I":
                    raise UsageError("-I (rebuilding aliases) is not supported: "
                                     "aliases live in [aliases] of opsrelay.toml")
                continue
            if letter == "q":  # -q[time]: its value is optional, so never take the next word
                raise UsageError(f"-q{word[j:]} (running the queue) is not supported: "
                                 "the relay (opsrelay serve) delivers and retries on its own")
            if letter not in _WITH_VALUE:
                raise UsageError(f"unknown option -{letter}")
            value = word[j:]
            if not value:
                if i >= len(words):
                    raise UsageError(f"option -{letter} needs a value")
                value = words[i]
                i += 1
            if letter in ("f", "r"):
                sender = value
            elif letter == "F":
                full_name = value
            elif letter == "o":
                # -oi is -i; -oem, -odi, -odb and every other -o option change nothing here.
                if value == "i":
                    dot_ends = False
            elif letter == "b":
                mode = _mode(value)
            elif letter == "C":
                raise UsageError("-C is not supported: opsrelay-sendmail reads $OPSRELAY_CONFIG "
                                 "or the usual search path")
            break  # the value took the rest of the word
    return Invocation(mode=mode, recipients=tuple(recipients), from_headers=from_headers, dot_ends=dot_ends,
                      sender=sender, full_name=full_name, verbose=verbose)
