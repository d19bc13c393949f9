"""Reading what the test SMTP server received, for the end-to-end tests."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

from tests.smtp_server import ReceivedMail, SmtpServer

__all__ = ["body", "mails_to", "parsed"]


def parsed(mail: ReceivedMail) -> EmailMessage:
    message = email.message_from_bytes(mail.content, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def body(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")  # the wire's CRLF (RFC 5321), kept by the parser


def mails_to(server: SmtpServer, address: str) -> list[ReceivedMail]:
    return [m for m in server.received if address in m.rcpt_tos]
