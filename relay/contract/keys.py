"""Routing keys and AMQP topic matching, all pure (selectors over them: :mod:`relay.notify.selector`).

Keys are ``proc.<host>.<group>.<process>.<STATE>`` for a process's state
change and ``sup.<host>.<STATE>`` for supervisord's own (RUNNING, STOPPING:
``SUPERVISOR_STATE_CHANGE_*``). Each word is percent-encoded (everything but ``A-Z a-z 0-9 _ -``) so that a name holding
``.``, ``*``, ``#``, ``%``, spaces or non-ASCII stays one word.

AMQP caps a routing key at 255 bytes (a shortstr). A word whose encoding is
longer than :data:`MAX_WORD` bytes is cut and ends in ``~`` plus 8 hex digits of
the SHA-256 of the whole name, so the key stays at most 4 + 3*60 + 8 + 4 = 196
bytes and two long names still get different words. The full names always
travel in the event body; a cut word cannot be decoded, only matched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = [
    "MAX_WORD",
    "KeyFields",
    "decode_word",
    "encode_word",
    "event_key",
    "key_fields",
    "split_key",
    "supervisor_key",
    "topic_matches",
]

MAX_WORD = 60
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_GLOB = frozenset("*?[")


def encode_word(name: str) -> str:
    encoded = "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in name.encode("utf-8"))
    if len(encoded) <= MAX_WORD:
        return encoded
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    cut = MAX_WORD - 9
    # Never end inside a %XX escape.
    if "%" in encoded[cut - 2 : cut]:
        cut = encoded.rindex("%", cut - 2, cut)
    return f"{encoded[:cut]}~{digest}"


def decode_word(word: str) -> str:
    if "~" in word:
        raise ValueError(f"routing-key word {word!r} was shortened and cannot be decoded")
    raw = bytearray()
    i = 0
    while i < len(word):
        ch = word[i]
        if ch == "%":
            hexdigits = word[i + 1 : i + 3]
            if len(hexdigits) != 2 or not all(c in "0123456789abcdefABCDEF" for c in hexdigits):
                raise ValueError(f"bad percent escape in routing-key word {word!r}")
            raw.append(int(hexdigits, 16))
            i += 3
        else:
            raw.extend(ch.encode("utf-8"))
            i += 1
    return raw.decode("utf-8")


def event_key(host: str, group: str, process: str, state: str) -> str:
    return ".".join(["proc", *(encode_word(w) for w in (host, group, process)), encode_word(state)])


def supervisor_key(host: str, state: str) -> str:
    """The key of supervisord's own state change, ``sup.<host>.<STATE>``."""
    return ".".join(["sup", encode_word(host), encode_word(state)])


def split_key(key: str) -> list[str]:
    """Words of a key or pattern as RabbitMQ splits them: ``""`` has none, ``"a."`` has two."""
    return key.split(".") if key else []


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic match: ``*`` is exactly one word, ``#`` zero or more."""
    pat, words = split_key(pattern), split_key(key)
    # reachable[j]: pattern prefix consumed so far can end right before word j.
    reachable = [True] + [False] * len(words)
    for p in pat:
        if p == "#":
            nxt, seen = [], False
            for r in reachable:
                seen = seen or r
                nxt.append(seen)
        else:
            nxt = [False] + [
                reachable[j] and (p == "*" or p == words[j]) for j in range(len(words))
            ]
        reachable = nxt
    return reachable[-1]


@dataclass(frozen=True, slots=True)
class KeyFields:
    host: str
    group: str
    process: str
    state: str
    expected: bool | None = None


def key_fields(key: str) -> KeyFields | None:
    """The names in a ``proc.`` or ``sup.`` key (group and process empty for ``sup.``, as in its
    event), or None when it is neither or a word was shortened."""
    words = split_key(key)
    shape = (words[0], len(words)) if words else None
    if shape not in (("proc", 5), ("sup", 3)):
        return None
    try:
        names = [decode_word(w) for w in words[1:]]
    except ValueError:
        return None
    if len(names) == 2:
        return KeyFields(names[0], "", "", names[1])
    host, group, process, state = names
    return KeyFields(host, group, process, state)
