"""Notices into mail through Jinja2 templates.

Templates come from the config file, so they run in Jinja2's sandbox with
``StrictUndefined`` and each is checked when the :class:`Renderer` is built (a
typo fails at start, not in the middle of an outage): its syntax, the names it
uses in every branch (not only the branch a sample takes), and one rendering on
a sample notice of the kind it serves. A failure is a :class:`ConfigError`
naming the file, ``subscriptions.<name>.<field>`` and the line.

Which template writes which notice (the variables are listed in
:mod:`relay.render.context`; every template sees all of them):

==========  ==============================  =============================================
kind        subscription fields             built-in default (relay/render/templates/)
==========  ==============================  =============================================
EVENT       subject, body                   subject.txt, body.txt
DIGEST      digest_subject, digest_body     digest_subject.txt, digest_body.txt
RECOVERED   (built-in only)                 recovered_subject.txt, recovered_body.txt
SUPPRESSED  (built-in only)                 suppressed_subject.txt, suppressed_body.txt
SILENCED    (built-in only)                 silenced_subject.txt, silenced_body.txt
==========  ==============================  =============================================

``html`` adds a text/html alternative to EVENT and DIGEST mails; it is rendered by
a second sandbox with autoescape on, so a process name cannot inject markup.
``subject_prefix`` ("PREFIX: subject", crashmail's ``-o``) and ``headers`` apply to
every kind. Headers are built by :func:`relay.mail.build_message`, which encodes
every value and keeps it on one line.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox

from relay.config.models import Config, Subscription
from relay.contract.event import Event
from relay.contract.mail import OutboundMail
from relay.errors import ConfigError, PermanentError
from relay.notify.notice import Notice, NoticeKind, event_mail_id, message_id_header
from relay.render.context import notice_context, sample_notice
from relay.render.mime import build_message, clean_header

__all__ = ["Renderer", "default_sender"]

_USER_FIELDS = {NoticeKind.EVENT: ("subject", "body"), NoticeKind.DIGEST: ("digest_subject", "digest_body")}
_BUILT_IN = {
    NoticeKind.EVENT: ("subject.txt", "body.txt"),
    NoticeKind.DIGEST: ("digest_subject.txt", "digest_body.txt"),
    NoticeKind.RECOVERED: ("recovered_subject.txt", "recovered_body.txt"),
    NoticeKind.SUPPRESSED: ("suppressed_subject.txt", "suppressed_body.txt"),
    NoticeKind.SILENCED: ("silenced_subject.txt", "silenced_body.txt"),
}
_HTML_KINDS = (NoticeKind.EVENT, NoticeKind.DIGEST)
# jinja2 names the code it compiles from a string "<template>"; its traceback rewriting
# (debug.rewrite_traceback_stack) gives those frames the template's own line numbers.
_TEMPLATE_FILE = "<template>"


def default_sender(config: Config) -> str:
    return config.smtp.from_ or f"opsrelay@{config.host}"


def _built_in(name: str) -> str:
    return (Path(__file__).parent / "templates" / name).read_text(encoding="utf-8")


def _environment(*, autoescape: bool) -> jinja2.sandbox.SandboxedEnvironment:
    return jinja2.sandbox.SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=autoescape, keep_trailing_newline=True
    )


def _template_line(exc: BaseException) -> int | None:
    """The template line an exception was raised on: the innermost ``<template>`` frame."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILE:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True, slots=True)
class _Template:
    field: str
    template: jinja2.Template


@dataclass(frozen=True, slots=True)
class _Templates:
    """What writes one kind of notice for one subscription."""

    subject: _Template
    body: _Template
    html: _Template | None


class Renderer:
    """Compiles and checks every subscription's templates once; renders notices into mail."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._text = _environment(autoescape=False)
        self._html = _environment(autoescape=True)
        self._built_in = {
            kind: (_Template(subject, self._text.from_string(_built_in(subject))),
                   _Template(body, self._text.from_string(_built_in(body))))
            for kind, (subject, body) in _BUILT_IN.items()
        }
        self._templates: dict[tuple[str, NoticeKind], _Templates] = {}
        for sub in config.subscriptions:
            self._prepare(sub)

    # -- building and checking ----------------------------------------------------------

    def _prepare(self, sub: Subscription) -> None:
        samples = {kind: notice_context(sample_notice(kind, sub), sub, self.config) for kind in _HTML_KINDS}
        known = set(samples[NoticeKind.EVENT]) | set(self._text.globals)
        html = None
        if sub.html is not None:
            html = self._check(self._html, sub, "html", sub.html, samples, known)
        for kind, (subject, body) in self._built_in.items():
            if kind in _USER_FIELDS:
                subject_field, body_field = _USER_FIELDS[kind]
                sample = {kind: samples[kind]}
                subject = self._pick(sub, subject_field, subject, sample, known)
                body = self._pick(sub, body_field, body, sample, known)
            self._templates[sub.name, kind] = _Templates(subject, body, html if kind in _HTML_KINDS else None)

    def _pick(self, sub: Subscription, field: str, built_in: _Template,
              sample: Mapping[NoticeKind, dict[str, Any]], known: set[str]) -> _Template:
        """The subscription's template for ``field`` when it has one, checked; else the built-in one."""
        source: str | None = getattr(sub, field)
        return built_in if source is None else self._check(self._text, sub, field, source, sample, known)

    def _error(self, sub: Subscription, field: str, line: int | None, message: str) -> ConfigError:
        text = _one_line(message)
        return ConfigError(f"line {line}: {text}" if line else text,
                           path=self.config.source, key=f"subscriptions.{sub.name}.{field}")

    def _check(self, env: jinja2.Environment, sub: Subscription, field: str, source: str,
               samples: Mapping[NoticeKind, dict[str, Any]], known: set[str]) -> _Template:
        try:
            tree = env.parse(source)
            template = env.from_string(tree)
        except jinja2.TemplateSyntaxError as exc:
            raise self._error(sub, field, exc.lineno, f"syntax error: {exc.message}") from None
        # StrictUndefined reports a name only on the branch that runs: look at every branch first.
        unknown = jinja2.meta.find_undeclared_variables(tree) - known
        if unknown:
            name, line = min(((n.name, n.lineno) for n in tree.find_all(jinja2.nodes.Name) if n.name in unknown),
                             key=lambda found: found[1])
            hint = difflib.get_close_matches(name, known, n=1)
            raise self._error(sub, field, line, f"unknown variable {name!r}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        for kind, context in samples.items():
            try:
                template.render(context)
            except Exception as exc:
                # Anything a template can raise (UndefinedError, SecurityError, TypeError, ...).
                raise self._error(sub, field, _template_line(exc),
                                  f"fails on a sample {kind.value} notice: {exc}") from None
        return _Template(field, template)

    # -- rendering ------------------------------------------------------------------------

    def render(self, sub: Subscription, event: Event) -> OutboundMail:
        """One event, one mail (crashmail's behaviour), with the Message-ID it always had."""
        notice = Notice(NoticeKind.EVENT, event_mail_id(event.id, sub.name), (event,), 1)
        return self.render_notice(sub, notice)

    def render_notice(self, sub: Subscription, notice: Notice) -> OutboundMail:
        """Raises PermanentError when a template fails on this notice (dead-lettered, replayable)."""
        if (sub.name, notice.kind) not in self._templates:
            self._prepare(sub)
        templates = self._templates[sub.name, notice.kind]
        try:
            context = notice_context(notice, sub, self.config)
        except ValueError as exc:
            raise PermanentError(f"subscription {sub.name}: {exc}") from None
        subject = _one_line(self._run(sub, notice, templates.subject, context))
        if sub.subject_prefix:
            subject = f"{clean_header(sub.subject_prefix)}: {subject}"
        body = self._run(sub, notice, templates.body, context)
        html = self._run(sub, notice, templates.html, context) if templates.html else None
        sender = default_sender(self.config)
        raw = build_message(
            sender=sender,
            to=sub.to,
            subject=subject,
            body=body,
            html=html,
            message_id=message_id_header(notice.mail_id, self.config.host),
            thread=notice.thread,
            # Ours last: an extra header of the same name replaces the one before it.
            extra_headers=[*sub.headers.items(), *self._own_headers(sub, notice)],
        )
        return OutboundMail(sender=sender, recipients=sub.to, raw=raw, message_id=notice.mail_id)

    @staticmethod
    def _own_headers(sub: Subscription, notice: Notice) -> Iterable[tuple[str, str]]:
        if notice.kind in (NoticeKind.EVENT, NoticeKind.RECOVERED):
            yield "X-Opsrelay-Event", notice.last.id
        yield "X-Opsrelay-Subscription", sub.name
        yield "X-Opsrelay-Kind", notice.kind.value

    @staticmethod
    def _run(sub: Subscription, notice: Notice, template: _Template, context: dict[str, Any]) -> str:
        try:
            return template.template.render(context)
        except Exception as exc:
            # Fine on the sample at start, fails on this notice: its events go to dead letters.
            line = _template_line(exc)
            where = f" (line {line})" if line else ""
            raise PermanentError(f"subscription {sub.name}: template {template.field}{where} failed on this "
                                 f"{notice.kind.value} notice: {_one_line(str(exc))}") from None
