"""crashmail's flags on ``opsrelay listen``: the same exits are mailed as superlance's crashmail mails.

Each case feeds one envelope, built by supervisord's own code (events.py, process.py),
to both sides:

* superlance's real ``CrashMail`` (its ``runforever(test=True)`` reads one event), with
  its ``mail`` replaced by a recorder, or with a fake sendmail command as in superlance's
  own tests;
* opsrelay's real listener loop (``listeners.eventlistener.run``), whose published event
  is then routed as the broker would (``topic_matches`` against the implicit
  subscription's bindings) and filtered (``Subscription.accepts``), and rendered.

superlance 2.0.0 never reads ``-p`` or ``-a`` (Supervisor/superlance#18): it mails every
unexpected exit. opsrelay follows crashmail's usage text for ``-p``, so crashmail's
decision here is its code's decision *and* the documented ``-p`` rule, written out
below from that text; :func:`test_superlance_ignores_p_which_opsrelay_honours` pins the
difference so that a fixed superlance is noticed.
"""

from __future__ import annotations

import email
import email.policy
import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import superlance.crashmail
from superlance.crashmail import CrashMail
from supervisor import events
from supervisor.process import EventListenerPool
from supervisor.states import ProcessStates
from typer.testing import CliRunner

from listeners.eventlistener import run
from relay.cli.app import app
from relay.config.crashmail import (
    NAME,
    CrashmailFlags,
    FlagError,
    config_with_crashmail,
    crashmail_subscription,
    local_mta_env,
)
from relay.config.models import Config, Security, load_config
from relay.contract.event import Event
from relay.contract.keys import event_key, topic_matches
from relay.errors import ConfigError
from relay.render.renderer import Renderer

HOST = "web1"
EMAIL = "chrism@plope.com"  # superlance's tests mail here
BIN = Path(sys.executable).parent


# -- one envelope, as supervisord writes it -----------------------------------------------------

def envelope(event_cls: type, name: str, group: str, *, expected: bool = False,
             from_state: int = ProcessStates.RUNNING, serial: int = 7) -> str:
    group_ns = SimpleNamespace(config=SimpleNamespace(name=group))
    process = SimpleNamespace(config=SimpleNamespace(name=name), group=group_ns, pid=4242, backoff=1)
    payload = event_cls(process, from_state, expected).payload()
    pool = SimpleNamespace(config=SimpleNamespace(name="crashmail", options=SimpleNamespace(identifier="supervisor")))
    text: str = EventListenerPool._eventEnvelope(pool, event_cls, serial, serial, payload)
    return text


def exited(name: str, group: str | None = None, *, expected: bool = False,
           from_state: int = ProcessStates.RUNNING) -> str:
    return envelope(events.ProcessStateExitedEvent, name, group or name, expected=expected, from_state=from_state)


# -- superlance's crashmail ---------------------------------------------------------------------

@dataclass(frozen=True)
class Mailed:
    to: str | None
    subject: str


def crashmail_mails(flags: CrashmailFlags, text: str,
                    sendmail: str = "/bin/false") -> tuple[CrashMail, list[Mailed]]:
    """superlance's CrashMail on one envelope; what it handed to ``mail``."""
    prog = CrashMail(list(flags.programs), flags.any_program, flags.email, sendmail, flags.optional_header)
    prog.stdin, prog.stdout, prog.stderr = io.StringIO(text), io.StringIO(), io.StringIO()
    calls: list[Mailed] = []
    prog.mail = lambda to, subject, msg: calls.append(Mailed(to, subject))
    prog.runforever(test=True)
    # It answered supervisord either way: READY, then RESULT 2 OK.
    assert prog.stdout.getvalue() == "READY\nRESULT 2\nOK", prog.stdout.getvalue()
    return prog, calls


def documented_p_rule(flags: CrashmailFlags, group: str, process: str) -> bool:
    """crashmail's usage: -p NAME, or -p GROUP:NAME for a process of a group; -a overrides -p."""
    if flags.any_program or not flags.programs:
        return True  # what superlance's code does (it reads neither flag)
    return process in flags.programs or f"{group}:{process}" in flags.programs


def crashmail_decision(flags: CrashmailFlags, text: str) -> Mailed | None:
    _, calls = crashmail_mails(flags, text)
    assert len(calls) <= 1
    if not calls or calls[0].to is None:
        # Without -m crashmail writes "To: None": nobody is mailed (its usage: "email will not be sent").
        return None
    header = text.partition("\n")[2]
    fields = dict(word.split(":", 1) for word in header.split())
    return calls[0] if documented_p_rule(flags, fields["groupname"], fields["processname"]) else None


# -- opsrelay -----------------------------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def publish(self, event: Event) -> None:
        self.events.append(event)


def opsrelay_decision(flags: CrashmailFlags, text: str, config: Config | None = None) -> Mailed | None:
    """The listener reads the envelope; the broker routes the event; the relay filters and renders it."""
    cfg = config_with_crashmail(config or Config(host=HOST), flags)
    stdout, published = io.StringIO(), Recorder()
    assert run(io.StringIO(text), stdout, published, host=HOST, max_events=1) == 0
    assert stdout.getvalue() == "READY\nRESULT 2\nOK"
    sub = crashmail_subscription(cfg, flags)
    if sub is None:
        assert cfg == (config or Config(host=HOST))
        return None
    mails = []
    for event in published.events:
        key = event_key(event.host, event.group, event.process, event.state)
        if any(topic_matches(binding, key) for binding in sub.bindings()) and sub.accepts(event):
            mail = Renderer(cfg).render(sub, event)
            message = email.message_from_bytes(mail.raw, policy=email.policy.default)
            mails.append(Mailed(", ".join(mail.recipients), str(message["Subject"])))
    assert len(mails) <= 1
    return mails[0] if mails else None


def without_time(subject: str) -> str:
    """crashmail: " NAME crashed at 2026-11-27 10:00:00,123" (local time); opsrelay: "... UTC"."""
    return re.sub(r" crashed at .*\Z", " crashed at", subject).strip()


def same_decision(flags: CrashmailFlags, text: str) -> Mailed | None:
    theirs, ours = crashmail_decision(flags, text), opsrelay_decision(flags, text)
    assert (theirs is None) == (ours is None), (theirs, ours)
    if theirs is not None and ours is not None:
        assert ours.to == theirs.to
        assert without_time(ours.subject) == without_time(theirs.subject)
        assert re.fullmatch(r".* crashed at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", ours.subject), ours.subject
    return ours


def flags(*programs: str, any_program: bool = False, email: str | None = EMAIL,
          header: str | None = "[foo]") -> CrashmailFlags:
    return CrashmailFlags.parse(programs=programs, any_program=any_program, email=email, optional_header=header)


# -- superlance's own test cases (superlance/tests/crashmail_test.py) ---------------------------

def test_superlance_not_process_state_exited() -> None:
    # Its very envelope: a bare PROCESS_STATE header with no payload.
    text = "eventname:PROCESS_STATE len:0\n"
    prog, calls = crashmail_mails(flags("foo", "bar", "baz_01"), text)
    assert prog.stderr.getvalue() == "non-exited event\n" and calls == []
    assert same_decision(flags("foo", "bar", "baz_01"), text) is None


def test_superlance_expected_exit() -> None:
    text = exited("foo", "bar", expected=True)
    prog, calls = crashmail_mails(flags("foo"), text)
    assert prog.stderr.getvalue() == "expected exit\n" and calls == []
    assert same_decision(flags("foo"), text) is None


def test_superlance_unexpected_exit() -> None:
    mailed = same_decision(flags("foo"), exited("foo", "bar"))
    assert mailed is not None
    assert mailed.to == EMAIL
    assert mailed.subject.startswith("[foo]: foo crashed at ")


def test_superlance_unexpected_exit_through_its_sendmail(tmp_path: Path) -> None:
    """As superlance's test: crashmail pipes to ``cat - > email.log``; opsrelay writes the same To and Subject."""
    log = tmp_path / "email.log"
    prog, _ = crashmail_mails(flags("foo"), exited("foo", "bar"), sendmail=f"cat - > {log}")
    prog.mail = CrashMail.mail.__get__(prog)  # the real one this time
    prog.stdin = io.StringIO(exited("foo", "bar"))
    prog.stdout = io.StringIO()
    prog.runforever(test=True)
    sent = email.message_from_string(log.read_text(), policy=email.policy.default)
    assert "Process foo in group bar exited unexpectedly" in sent.get_content()
    ours = opsrelay_decision(flags("foo"), exited("foo", "bar"))
    assert ours is not None
    assert ours.to == sent["To"] == EMAIL
    assert without_time(ours.subject) == without_time(str(sent["Subject"])) == "[foo]: foo crashed at"


# -- -p, -a, -m, -o -------------------------------------------------------------------------------

@pytest.mark.parametrize(("case", "mailed"), [
    ((("foo",), "foo", "bar"), True),                      # -p NAME: that process in any group
    ((("foo",), "foo", "foo"), True),                      # ... also a program of its own (group == name)
    ((("bar:foo",), "foo", "bar"), True),                  # -p GROUP:NAME
    ((("foo:foo",), "foo", "foo"), True),
    ((("other:foo",), "foo", "bar"), False),               # another group
    ((("bar",), "foo", "bar"), False),                     # a group name is not a process name
    ((("baz",), "foo", "bar"), False),
    ((("baz", "bar:foo"), "foo", "bar"), True),            # several -p: any of them
    ((("baz", "qux", "other:foo"), "foo", "bar"), False),
    ((("wor*",), "worker", "worker"), False),              # names are literal, no globs
    ((("a*b",), "a*b", "a*b"), True),
    ((("grp:a[1]",), "a[1]", "grp"), True),
])
def test_p_selects_processes(case: tuple[tuple[str, ...], str, str], mailed: bool) -> None:
    programs, name, group = case
    assert (same_decision(flags(*programs), exited(name, group)) is not None) is mailed


@pytest.mark.parametrize("programs", [(), ("baz",), ("other:foo", "qux")])
def test_a_mails_any_process_and_overrides_p(programs: tuple[str, ...]) -> None:
    mailed = same_decision(flags(*programs, any_program=True), exited("foo", "bar"))
    assert mailed is not None and mailed.subject.startswith("[foo]: foo crashed at ")


def test_m_without_p_or_a_mails_any_process() -> None:
    # superlance's code mails every unexpected exit; its usage does not say otherwise for this case.
    assert same_decision(flags(), exited("foo", "bar")) is not None


@pytest.mark.parametrize("selection", [{"programs": ("foo",)}, {"any_program": True}, {}])
def test_no_mail_without_m(selection: dict[str, Any]) -> None:
    no_m = CrashmailFlags.parse(email=None, optional_header="ACME", **selection)
    # crashmail calls its mail function with no address ("To: None"): nobody receives it.
    _, calls = crashmail_mails(no_m, exited("foo", "bar"))
    assert [c.to for c in calls] == [None]
    assert same_decision(no_m, exited("foo", "bar")) is None
    assert "no mail is sent" in " ".join(no_m.notes())


@pytest.mark.parametrize("selection", [{"programs": ("foo",)}, {"any_program": True}])
def test_expected_exit_is_never_mailed(selection: dict[str, Any]) -> None:
    assert same_decision(CrashmailFlags.parse(email=EMAIL, **selection), exited("foo", "bar", expected=True)) is None


def test_an_exit_before_startsecs_is_an_unexpected_exit() -> None:
    # supervisord: STARTING -> EXITED is expected:0 whatever the exit code (the process died too quickly).
    assert same_decision(flags("foo"), exited("foo", "bar", from_state=ProcessStates.STARTING)) is not None


@pytest.mark.parametrize(("event_cls", "from_state"), [
    (events.ProcessStateFatalEvent, ProcessStates.BACKOFF),
    (events.ProcessStateBackoffEvent, ProcessStates.STARTING),
    (events.ProcessStateStartingEvent, ProcessStates.STOPPED),
    (events.ProcessStateRunningEvent, ProcessStates.STARTING),
    (events.ProcessStateStoppingEvent, ProcessStates.RUNNING),
    (events.ProcessStateStoppedEvent, ProcessStates.STOPPING),
    (events.ProcessStateUnknownEvent, ProcessStates.RUNNING),
])
def test_states_other_than_exited_are_never_mailed(event_cls: type, from_state: int) -> None:
    # Even "unexpected" ones (expected=False): crashmail looks at PROCESS_STATE_EXITED only.
    text = envelope(event_cls, "foo", "bar", expected=False, from_state=from_state)
    prog, calls = crashmail_mails(flags(any_program=True), text)
    assert prog.stderr.getvalue() == "non-exited event\n" and calls == []
    assert same_decision(flags(any_program=True), text) is None


def test_tick_events_are_never_mailed() -> None:
    text = "ver:3.0 server:supervisor serial:9 pool:crashmail poolserial:9 eventname:TICK_5 len:15\nwhen:1700000000"
    assert same_decision(flags(any_program=True), text) is None


@pytest.mark.parametrize(("header", "subject"), [
    (None, "foo crashed at"),
    ("ACME", "ACME: foo crashed at"),
    ("web1 prod", "web1 prod: foo crashed at"),
])
def test_o_prefixes_the_subject(header: str | None, subject: str) -> None:
    mailed = same_decision(flags(any_program=True, header=header), exited("foo", "bar"))
    assert mailed is not None and without_time(mailed.subject) == subject


def test_the_subject_names_the_process_not_the_group() -> None:
    mailed = same_decision(flags("bar:foo"), exited("foo", "bar"))
    assert mailed is not None and without_time(mailed.subject) == "[foo]: foo crashed at"


def test_superlance_ignores_p_which_opsrelay_honours() -> None:
    """Supervisor/superlance#18: crashmail 2.0.0 mails a process -p did not name; opsrelay does not."""
    _, calls = crashmail_mails(flags("baz"), exited("foo", "bar"))
    assert [c.to for c in calls] == [EMAIL], "superlance now reads -p: compare with its code, not its usage"
    assert opsrelay_decision(flags("baz"), exited("foo", "bar")) is None


# -- the implicit subscription and the config ---------------------------------------------------

def test_the_implicit_subscription() -> None:
    sub = crashmail_subscription(Config(host=HOST), flags("foo", "grp:bar", header="ACME"))
    assert sub is not None
    assert (sub.name, sub.to, sub.states, sub.unexpected_only, sub.subject_prefix) == (
        NAME, (EMAIL,), ("EXITED",), True, "ACME")
    assert sub.programs == ("foo", "grp:bar") and sub.hosts == (HOST,)
    assert sub.bindings() == ("proc.web1.*.foo.EXITED", "proc.web1.grp.bar.EXITED")
    assert not sub.stateful  # one mail per crash, as crashmail


def test_m_takes_a_list_and_local_names_as_sendmail_t_did() -> None:
    base = Config.model_validate({"host": HOST, "aliases": {"root": "ops@example.com"}})
    sub = crashmail_subscription(base, CrashmailFlags.parse(any_program=True, email="root, Dev <dev@example.com>,bob"))
    assert sub is not None and sub.to == ("ops@example.com", "dev@example.com", f"bob@{HOST}")


@pytest.mark.parametrize("address", ["not an address", "a@b\r\nBcc: x@y", "<>", " , "])
def test_a_bad_address_is_a_one_line_config_error(address: str) -> None:
    with pytest.raises((ConfigError, FlagError)) as caught:
        config_with_crashmail(Config(host=HOST), CrashmailFlags.parse(any_program=True, email=address))
    assert "\n" not in str(caught.value)
    if isinstance(caught.value, ConfigError):
        assert caught.value.key == "-m/--email"


@pytest.mark.parametrize("program", ["", "grp:", ":foo"])
def test_p_without_a_process_is_a_usage_error(program: str) -> None:
    with pytest.raises(FlagError, match="names no process"):
        CrashmailFlags.parse(programs=[program], email=EMAIL)


def test_a_config_subscription_named_like_the_implicit_one_is_refused() -> None:
    base = Config.model_validate({"host": HOST, "subscriptions": [{"name": NAME, "to": ["x@example.com"]}]})
    with pytest.raises(ConfigError, match="rename it"):
        config_with_crashmail(base, flags(any_program=True))


def test_the_config_keeps_its_own_subscriptions() -> None:
    base = Config.model_validate({"host": HOST, "subscriptions": [{"name": "crashes", "to": ["x@example.com"]}]})
    cfg = config_with_crashmail(base, flags(any_program=True))
    assert [s.name for s in cfg.subscriptions] == ["crashes", NAME]
    assert config_with_crashmail(base, CrashmailFlags.parse(any_program=True)) is base


def test_on_a_shared_broker_each_host_has_its_own_queue() -> None:
    fleet = Config.model_validate({"host": "web1.dc", "broker": {"url": "amqp://guest:guest@127.0.0.1:5672/"}})
    sub = crashmail_subscription(fleet, flags(any_program=True))
    assert sub is not None and sub.name == "crashmail-web1-dc" and sub.hosts == ("web1.dc",)


@pytest.mark.parametrize(("sendmail", "config_from", "sender"), [
    ("/usr/sbin/sendmail -t -i -f crash-notifier@example.com", "", "crash-notifier@example.com"),
    ("/usr/sbin/sendmail -t -i -fcrash@example.com", "", "crash@example.com"),
    ("sendmail -t -r crash@example.com", "", "crash@example.com"),
    ("/usr/sbin/sendmail -t -i -f crash@example.com", "alerts@example.com", "alerts@example.com"),
    ("/usr/sbin/sendmail -t -i", "", ""),
    ("cat - > /tmp/email.log", "", ""),  # superlance's own tests; not a sendmail: nothing to keep
])
def test_s_keeps_its_sender_unless_the_config_has_one(sendmail: str, config_from: str, sender: str) -> None:
    base = Config.model_validate({"host": HOST, "smtp": {"from": config_from}})
    cfg = config_with_crashmail(base, CrashmailFlags.parse(any_program=True, email=EMAIL, sendmail=sendmail))
    assert cfg.smtp.from_ == sender
    sub = crashmail_subscription(cfg, flags(any_program=True))
    assert sub is not None
    mail = Renderer(cfg).render(cfg.subscriptions[-1], Event(host=HOST, group="g", process="p",
                                                              event="PROCESS_STATE_EXITED", state="EXITED"))
    assert mail.sender == (sender or f"opsrelay@{HOST}")


def test_without_a_config_file_mail_goes_to_the_local_mta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    env = {"HOME": str(tmp_path)}
    cfg = load_config(None, local_mta_env(env))
    assert cfg.source == "(defaults)"
    assert (cfg.smtp.host, cfg.smtp.effective_port, cfg.smtp.security, cfg.smtp.username) == (
        "localhost", 25, Security.NONE, "")
    # The operator's own smarthost settings win, whole.
    own = load_config(None, local_mta_env({**env, "OPSRELAY_SMTP__HOST": "smtp.example.com"}))
    assert (own.smtp.host, own.smtp.security) == ("smtp.example.com", Security.STARTTLS)


# -- the command line: crashmail's argv, parsed the same way --------------------------------------

ARGVS = [
    ["-a", "-m", "ops@example.com"],
    ["-am", "ops@example.com"],
    ["-p", "foo", "-p", "grp:bar", "-m", "ops@example.com", "-o", "ACME"],
    ["-pfoo", "-mops@example.com", "-oACME"],
    ["--program=foo", "--any", "--email=ops@example.com", "--optionalheader=ACME",
     "--sendmail_program=/usr/sbin/sendmail -t -i -f crash@example.com"],
    ["-o", "hostname", "-a", "-m", "notify-on-crash@domain.com",
     "-s", "/usr/sbin/sendmail -t -i -f crash-notifier@domain.com"],  # crashmail.py's own sample
]


@pytest.mark.parametrize("argv", ARGVS)
def test_crashmail_argv_parses_to_the_same_flags(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class Captured:
        def __init__(self, programs: list[str], any: bool, email: str | None, sendmail: str,
                     optionalheader: str | None) -> None:
            seen["crashmail"] = (tuple(programs), any, email, optionalheader, sendmail)

        def runforever(self) -> None:
            pass

    monkeypatch.setattr(superlance.crashmail, "CrashMail", Captured)
    monkeypatch.setenv("SUPERVISOR_SERVER_URL", "unix:///tmp/supervisor.sock")
    superlance.crashmail.main(["crashmail", *argv])

    real_parse: Callable[..., CrashmailFlags] = CrashmailFlags.parse

    def capture(cls: type[CrashmailFlags], /, **kwargs: Any) -> CrashmailFlags:
        seen["opsrelay"] = real_parse(**kwargs)
        raise FlagError("captured")

    monkeypatch.setattr(CrashmailFlags, "parse", classmethod(capture))
    result = CliRunner().invoke(app, ["listen", *argv])
    assert result.exit_code == 64, result.output
    ours: CrashmailFlags = seen["opsrelay"]
    default_sendmail = "/usr/sbin/sendmail -t -i"
    assert (ours.programs, ours.any_program, ours.email, ours.optional_header, ours.sendmail or default_sendmail) \
        == seen["crashmail"]


def test_a_bad_address_exits_78_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "opsrelay.toml"
    config.write_text(f'host = "{HOST}"\n[broker]\nurl = "sqlite:///{tmp_path}/queue.db"\n', encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSRELAY_")}
    result = subprocess.run([str(BIN / "opsrelay"), "listen", "-a", "-m", "ops at example", "--config", str(config)],
                            input="", capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 78, result.stderr
    assert result.stdout == ""  # stdout is supervisord's; it never heard READY
    assert result.stderr.strip().splitlines() == [
        "opsrelay: config error: -m/--email: 'ops at example' is not a mail address"]
