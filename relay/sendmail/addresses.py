"""Addresses on the sendmail path, as pure functions: address lists, aliases, the envelope sender.

Rules (DESIGN.md, "sendmail front end"; issue 5):

- a recipient without a domain (``root``, cron's ``MAILTO=user``) is looked up in ``[aliases]``,
  then in its ``"*"`` entry (ssmtp's ``root=`` lands there), else it becomes ``name@domain``;
- the envelope sender is ``-f``/``-r``, then the invoking user's entry in ``[sendmail.senders]``
  (ssmtp's ``revaliases``), then ``smtp.from``, then ``user@domain``;
- ``domain`` is ``sendmail.domain`` (ssmtp's ``rewriteDomain``, else its ``hostname``), else ``host``.

No dataclasses, enum or typing imports: this runs on every submission.
"""

from __future__ import annotations

import binascii

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "AddressError",
    "envelope_sender",
    "format_mailbox",
    "parse_address_list",
    "qualify",
    "resolve_recipient",
]

# RFC 5322 §3.2.3 atext, plus the space between words of a display name.
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~ ")
# What cannot stand unquoted in a local part or a domain (RFC 5322 §3.2.3 specials, and space).
_SPECIALS = frozenset(' <>()[]:;@\\,"')


class AddressError(ValueError):
    """Not a mail address we can put on an SMTP command line."""


def _split(text: str) -> list[str]:
    """Entries of an address list: split at ``,`` and ``;`` outside quotes, comments and <...>.

    A ``:`` outside those ends a group's display name (RFC 5322 §3.4 ``group``), which is dropped,
    so ``team: a@x, b@y;`` and ``undisclosed-recipients:;`` need no special case.
    """
    parts: list[str] = []
    current: list[str] = []
    depth = 0  # (comments) nest, RFC 5322 §3.2.2
    quoted = angle = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and (quoted or depth):
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif depth:
            depth += (ch == "(") - (ch == ")")
        elif ch == '"':
            quoted = True
        elif ch == "(":
            depth = 1
        elif angle:
            angle = ch != ">"
        elif ch == "<":
            angle = True
        elif ch in ",;":
            parts.append("".join(current))
            current = []
            continue
        elif ch == ":":
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _without_comments(text: str) -> str:
    out: list[str] = []
    depth = 0
    quoted = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and (quoted or depth):
            escaped = True
            if depth:
                continue
        elif quoted:
            quoted = ch != '"'
        elif ch == '"' and not depth:
            quoted = True
        elif ch == "(":
            depth += 1
            continue
        elif ch == ")" and depth:
            depth -= 1
            continue
        if not depth:
            out.append(ch)
    return "".join(out)


def _addr_spec(entry: str) -> str:
    start = entry.find("<")
    if start >= 0:
        end = entry.find(">", start)
        if end < 0:
            raise AddressError(f"{entry!r} has no closing '>'")
        inner = entry[start + 1:end].strip()
        # Obsolete source routes (RFC 5322 §4.4): <@relay:user@host> is user@host.
        if inner.startswith("@") and ":" in inner:
            inner = inner.rpartition(":")[2]
        return inner
    return _without_comments(entry).strip()


def check_mailbox(address: str) -> str:
    """The address if it is one mailbox (``local`` or ``local@domain``), else AddressError."""
    if not address:
        raise AddressError("an empty address")
    if any(ord(c) < 32 or ord(c) == 127 for c in address):
        raise AddressError(f"{address!r} holds control characters")
    local, at, domain = address.rpartition("@") if "@" in address else (address, "", "")
    # A quoted local part may hold anything printable ("john doe"@example.com), a domain
    # literal its brackets (user@[192.0.2.1]); elsewhere these characters end an address.
    local_ok = (len(local) >= 2 and local[0] == local[-1] == '"') or not any(c in _SPECIALS for c in local)
    domain_ok = (domain.startswith("[") and domain.endswith("]")) or not any(c in _SPECIALS for c in domain)
    if not local or (at and not domain) or not local_ok or not domain_ok:
        raise AddressError(f"{address!r} is not a mail address")
    return address


def parse_address_list(text: str) -> list[str]:
    """The addr-specs of an address list: ``'Bob <b@y>, a@x (Al)'`` -> ``['b@y', 'a@x']``.

    Raises AddressError for an entry that is not one mailbox.
    """
    return [check_mailbox(_addr_spec(entry)) for entry in _split(text) if _addr_spec(entry)]


def qualify(address: str, domain: str) -> str:
    """``user`` -> ``user@domain``; an address with a domain is kept."""
    return address if "@" in address else f"{address}@{domain}"


def resolve_recipient(address: str, aliases: Mapping[str, str], domain: str) -> str:
    """A recipient as it will be mailed: aliases and the ``"*"`` catch-all apply to local names only."""
    if "@" in address:
        return address
    target = aliases.get(address) or aliases.get(address.lower()) or aliases.get("*")
    return qualify(target, domain) if target else qualify(address, domain)


def envelope_sender(minus_f: str | None, user: str, senders: Mapping[str, str], smtp_from: str,
                    domain: str) -> str:
    """``-f``, then the user's ``[sendmail.senders]`` entry, then ``smtp.from``, then ``user@domain``.

    ``-f '<>'`` is the null sender of RFC 5321 §4.5.5 (bounces, auto-replies): ``""``.
    """
    if minus_f is not None:
        given = minus_f.strip()
        if given.startswith("<") and given.endswith(">"):
            given = given[1:-1].strip()
        return qualify(check_mailbox(given), domain) if given else ""
    if senders.get(user):
        return qualify(senders[user], domain)
    if smtp_from:
        return smtp_from
    return qualify(user, domain)


def format_mailbox(name: str, address: str) -> str:
    """A From: value: ``Name <addr>``, the name quoted (RFC 5322 §3.2.4) or encoded (RFC 2047)."""
    name = " ".join(name.split())  # no CR/LF/TAB: a name can never start another header
    if not name:
        return address
    if not name.isascii():
        # RFC 2047 §5(3): an encoded-word may stand for a phrase; ≤ 75 characters each.
        words, chunk = [], ""
        for ch in name:
            if len((chunk + ch).encode("utf-8")) > 45:
                words.append(chunk)
                chunk = ""
            chunk += ch
        words.append(chunk)
        encoded = " ".join(
            "=?utf-8?b?" + binascii.b2a_base64(w.encode("utf-8"), newline=False).decode("ascii") + "?="
            for w in words)
        return f"{encoded} <{address}>"
    if all(c in _ATEXT for c in name):
        return f"{name} <{address}>"
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{address}>'
