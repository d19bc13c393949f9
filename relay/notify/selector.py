"""Subscription selectors (crashmail-style ``programs``, ``hosts``, ``states``), all pure.

A :class:`Selector` compiles to the narrowest AMQP topic bindings over the routing keys of
:mod:`relay.contract.keys`; what a binding cannot express (a glob inside a word,
``unexpected_only``) is checked by :meth:`Selector.accepts` after consumption.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from relay.contract.event import STATES
from relay.contract.keys import _GLOB, encode_word

__all__ = ["Selector"]


class _EventFields(Protocol):
    @property
    def host(self) -> str: ...
    @property
    def group(self) -> str: ...
    @property
    def process(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def expected(self) -> bool | None: ...


def _word_or_star(value: str) -> str:
    return "*" if value == "*" or _GLOB & set(value) else encode_word(value)


@dataclass(frozen=True, slots=True)
class Selector:
    """crashmail-style selection: ``programs`` as ``name``, ``group:name`` or globs.

    Compiles to the narrowest AMQP bindings; what a binding cannot express (a
    glob inside a word, ``unexpected_only``) is checked by :meth:`accepts` after
    consumption.
    """

    programs: tuple[str, ...] = ("*",)
    hosts: tuple[str, ...] = ("*",)
    states: tuple[str, ...] = STATES
    unexpected_only: bool = False

    def bindings(self) -> tuple[str, ...]:
        out: dict[str, None] = {}
        for host in self.hosts:
            for group, process in (_split_program(p) for p in self.programs):
                for state in self.states:
                    words = ["proc", _word_or_star(host), _word_or_star(group),
                             _word_or_star(process), _word_or_star(state)]
                    out[".".join(words)] = None
        return tuple(out)

    def accepts(self, event: _EventFields) -> bool:
        if self.unexpected_only and event.expected is True:
            return False
        if not _any_glob(self.hosts, event.host) or not _any_glob(self.states, event.state):
            return False
        return any(
            fnmatch.fnmatchcase(event.group, group) and fnmatch.fnmatchcase(event.process, process)
            for group, process in map(_split_program, self.programs)
        )


def _split_program(program: str) -> tuple[str, str]:
    """crashmail's rule: ``name`` matches that process in any group; ``group:name`` in one group."""
    if program == "*":
        return "*", "*"
    group, sep, process = program.partition(":")
    return (group, process or "*") if sep else ("*", program)


def _any_glob(patterns: Iterable[str], value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)
