"""Events into mail through Jinja2 templates.

Templates come from the config file, so they run in Jinja2's sandbox with
``StrictUndefined`` (a typo fails at start, not in the middle of an outage)
and are compiled once when the relay starts. The result is plain text; headers
are built by :func:`relay.mail.build_message`, which encodes every value.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox

from relay.config import Config, Subscription
from relay.errors import ConfigError, PermanentError
from relay.event import Event
from relay.mail import OutboundMail, build_message, clean_header

__all__ = ["Renderer", "default_sender", "event_context"]

_SUMMARIES = {
    "STOPPED": "was stopped",
    "STARTING": "is starting",
    "RUNNING": "is running",
    "BACKOFF": "is failing to start (BACKOFF)",
    "STOPPING": "is stopping",
    "FATAL": "could not be started (FATAL)",
    "UNKNOWN": "is in an unknown state",
}
# Rendered once at start: StrictUndefined reports a typo'd variable only when rendering.
_SAMPLE = Event(host="web1", group="workers", process="worker_03", event="PROCESS_STATE_EXITED", state="EXITED",
                from_state="RUNNING", expected=False, pid=4242, tries=0, log_tail="last line")
_MESSAGE_IDS = uuid.UUID("6f7073e2-7265-4c61-b900-000000000001")


def _summary(event: Event) -> str:
    if event.state == "EXITED":
        return "exited as expected" if event.expected else "exited unexpectedly"
    return _SUMMARIES.get(event.state, f"is {event.state}")


def _time(at: str) -> str:
    try:
        return datetime.strptime(at, "%Y-%m-%dT%H:%M:%S.%fZ").strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return at


def event_context(event: Event) -> dict[str, Any]:
    """Template variables; names are shown on one line whatever control characters they hold."""
    names = {key: clean_header(getattr(event, key)) for key in ("host", "group", "process")}
    return {**event.to_dict(), **names, "program": clean_header(event.program),
            "summary": _summary(event), "time": _time(event.at)}


def default_sender(config: Config) -> str:
    return config.smtp.from_ or f"opsrelay@{config.host}"


def _default(name: str) -> str:
    return (Path(__file__).parent / "templates" / name).read_text(encoding="utf-8")


class Renderer:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._env = jinja2.sandbox.SandboxedEnvironment(
            undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
        )
        default_subject, default_body = _default("subject.txt"), _default("body.txt")
        self._templates: dict[str, tuple[jinja2.Template, jinja2.Template]] = {}
        for sub in config.subscriptions:
            self._templates[sub.name] = (
                self._compile(sub, "subject", sub.subject or default_subject),
                self._compile(sub, "body", sub.body or default_body),
            )

    def _compile(self, sub: Subscription, which: str, source: str) -> jinja2.Template:
        key = f"subscriptions.{sub.name}.{which}"
        try:
            template = self._env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"template error on line {exc.lineno}: {exc.message}", key=key) from None
        try:
            template.render(event_context(_SAMPLE))
        except jinja2.TemplateError as exc:
            raise ConfigError(f"template fails on a sample event: {exc}", key=key) from None
        return template

    def render(self, sub: Subscription, event: Event) -> OutboundMail:
        subject_t, body_t = self._templates[sub.name]
        context = event_context(event)
        try:
            subject, body = subject_t.render(context), body_t.render(context)
        except jinja2.TemplateError as exc:
            # Fine on the sample at start, fails on this event: the event goes to dead letters.
            raise PermanentError(f"subscription {sub.name}: template failed on this event: {exc}") from None
        # Stable across redeliveries of the same event: duplicates can be recognised.
        mail_id = str(uuid.uuid5(_MESSAGE_IDS, f"{event.id}/{sub.name}"))
        sender = default_sender(self.config)
        raw = build_message(
            sender=sender,
            to=sub.to,
            subject=subject,
            body=body,
            message_id=f"<{mail_id}@opsrelay.{self.config.host}>",
            extra_headers=[("X-Opsrelay-Event", event.id), ("X-Opsrelay-Subscription", sub.name)],
        )
        return OutboundMail(sender=sender, recipients=sub.to, raw=raw, message_id=mail_id)
