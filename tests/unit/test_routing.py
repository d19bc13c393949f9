"""relay.contract.keys: routing-key words, AMQP topic matching, selectors and their residual filter."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from relay.config.models import Subscription
from relay.contract.event import STATES, Event
from relay.contract.keys import (
    MAX_WORD,
    KeyFields,
    decode_word,
    encode_word,
    event_key,
    key_fields,
    split_key,
    supervisor_key,
    topic_matches,
)
from relay.notify.selector import Selector

# -- words ---------------------------------------------------------------------------------


@given(st.text(max_size=5))
def test_short_names_round_trip(name: str) -> None:
    # 5 characters are at most 20 UTF-8 bytes, 60 escaped: never shortened.
    word = encode_word(name)
    assert len(word) <= MAX_WORD
    assert decode_word(word) == name


@given(st.text())
def test_round_trip_whenever_the_word_fits(name: str) -> None:
    word = encode_word(name)
    full_size = sum(1 if (c.isascii() and (c.isalnum() or c in "_-")) else 3 * len(c.encode()) for c in name)
    if full_size <= MAX_WORD:
        assert decode_word(word) == name
    else:
        with pytest.raises(ValueError, match="shortened"):
            decode_word(word)


@given(st.text())
def test_words_are_single_ascii_amqp_words(name: str) -> None:
    word = encode_word(name)
    assert word.isascii()
    assert not set(".*#") & set(word)
    assert len(word.encode("ascii")) <= MAX_WORD
    # One word, even for an empty name or one made of dots.
    assert len(split_key(f"proc.{word}.x")) == 3


@pytest.mark.parametrize(
    ("name", "word"),
    [("web1", "web1"), ("worker_03", "worker_03"), ("a-b", "a-b"), ("db.main", "db%2Emain"),
     ("*", "%2A"), ("#", "%23"), ("%", "%25"), ("a b", "a%20b"), ("~", "%7E"), ("ü", "%C3%BC"), ("", "")],
)
def test_known_encodings(name: str, word: str) -> None:
    assert encode_word(name) == word
    assert decode_word(word) == name


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_distinct_long_names_give_distinct_words(a: str, b: str) -> None:
    # A long shared start, so only the digest can tell the two words apart.
    common = "worker_pool_for_the_nightly_batch_" * 3
    assume(a != b)
    word_a, word_b = encode_word(common + a), encode_word(common + b)
    assert word_a != word_b
    assert len(word_a) <= MAX_WORD and len(word_b) <= MAX_WORD
    assert "~" in word_a and "~" in word_b


@given(st.text(min_size=MAX_WORD))
def test_shortened_word_never_ends_inside_an_escape(name: str) -> None:
    word = encode_word(name)
    if "~" in word:
        head = word.rpartition("~")[0]
        # Every % in the kept head starts a whole %XX escape.
        for i, ch in enumerate(head):
            if ch == "%":
                assert len(head[i + 1 : i + 3]) == 2, word


@pytest.mark.parametrize("filler", ["a", "é", "日", ".", "🙂"])
def test_event_key_of_huge_names_fits_a_shortstr(filler: str) -> None:
    name = filler * 1000
    key = event_key(name, name, name, name)
    assert len(key.encode("utf-8")) <= 255
    words = split_key(key)
    assert len(words) == 5 and words[0] == "proc"


def test_event_key_example_from_the_design() -> None:
    assert event_key("web1", "workers", "worker_03", "FATAL") == "proc.web1.workers.worker_03.FATAL"
    assert event_key("db.main", "grüppe", "a*b#c", "EXITED") == "proc.db%2Emain.gr%C3%BCppe.a%2Ab%23c.EXITED"


@pytest.mark.parametrize("word", ["%", "%4", "%G1", "%ZZ", "%+1", "% 1", "abc%"])
def test_malformed_escapes_are_refused(word: str) -> None:
    with pytest.raises(ValueError, match="percent escape"):
        decode_word(word)


def test_invalid_utf8_in_a_word_is_refused() -> None:
    with pytest.raises(ValueError):
        decode_word("%C3")


# -- topic matching ------------------------------------------------------------------------

TOPIC_CASES = [
    # (pattern, key, matches) with AMQP 0-9-1 topic rules as RabbitMQ applies them.
    ("a.b.c", "a.b.c", True),
    ("a.b.c", "a.b", False),
    ("a.b", "a.b.c", False),
    ("*", "a", True),
    ("*", "", False),
    ("*", "a.b", False),
    ("*", ".", False),
    ("*.*", ".", True),
    ("a.*", "a.b", True),
    ("a.*", "a", False),
    ("a.*", "a.", True),
    ("*.b", ".b", True),
    ("a..b", "a..b", True),
    ("a.*.b", "a..b", True),
    ("a.b", "a..b", False),
    ("#", "", True),
    ("#", "a", True),
    ("#", "a.b.c", True),
    ("#", ".", True),
    ("#.c", "c", True),
    ("#.c", "a.b.c", True),
    ("#.c", "a.b", False),
    ("#.c", "c.a", False),
    ("a.#", "a", True),
    ("a.#", "a.b.c", True),
    ("a.#", "b", False),
    ("a.#", "b.a", False),
    ("a.#.c", "a.c", True),
    ("a.#.c", "a.x.y.c", True),
    ("a.#.c", "a.x.y", False),
    ("a.#.c", "x.a.c", False),
    ("#.#", "", True),
    ("#.#", "a.b", True),
    ("a.#.#.b", "a.b", True),
    ("a.#.#.b", "a.x.y.z.b", True),
    ("#.b.#", "b", True),
    ("#.b.#", "x.b.y", True),
    ("#.b.#", "a.c", False),
    ("#.*", "", False),
    ("#.*", "a", True),
    ("*.#", "a.b", True),
    ("*.#.*", "a", False),
    ("*.#.*", "a.b", True),
    ("", "", True),
    ("", "a", False),
    ("a", "", False),
    ("proc.*.*.*.FATAL", "proc.web1.workers.worker_03.FATAL", True),
    ("proc.*.*.*.FATAL", "proc.web1.workers.worker_03.EXITED", False),
    ("proc.web1.#", "proc.web1.workers.worker_03.FATAL", True),
    ("proc.#.FATAL", "proc.web1.workers.worker_03.FATAL", True),
    ("proc.#.FATAL", "proc.web1.workers.FATAL.EXITED", False),
]


@pytest.mark.parametrize(("pattern", "key", "expected"), TOPIC_CASES)
def test_topic_matches(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


def test_split_key() -> None:
    assert split_key("") == []
    assert split_key("a.") == ["a", ""]
    assert split_key(".") == ["", ""]
    assert split_key("proc.a.b") == ["proc", "a", "b"]


# -- selectors -----------------------------------------------------------------------------


def ev(host: str = "web1", group: str = "workers", process: str = "worker_03", state: str = "EXITED",
       expected: bool | None = False) -> Event:
    return Event(host=host, group=group, process=process, event=f"PROCESS_STATE_{state}", state=state,
                 expected=expected if state == "EXITED" else None)


@pytest.mark.parametrize(
    ("selector", "bindings"),
    [
        (Selector(programs=("group1:prog2",), states=("FATAL",)), ("proc.*.group1.prog2.FATAL",)),
        (Selector(programs=("group1:prog2",), states=("EXITED", "FATAL")),
         ("proc.*.group1.prog2.EXITED", "proc.*.group1.prog2.FATAL")),
        (Selector(programs=("worker_*",), states=("EXITED", "FATAL")), ("proc.*.*.*.EXITED", "proc.*.*.*.FATAL")),
        (Selector(programs=("name",), states=("FATAL",)), ("proc.*.*.name.FATAL",)),
        (Selector(programs=("group1:*",), states=("FATAL",)), ("proc.*.group1.*.FATAL",)),
        (Selector(programs=("grp*:prog",), states=("FATAL",)), ("proc.*.*.prog.FATAL",)),
        (Selector(programs=("db.main",), states=("FATAL",)), ("proc.*.*.db%2Emain.FATAL",)),
        (Selector(programs=("wörker",), states=("FATAL",)), ("proc.*.*.w%C3%B6rker.FATAL",)),
        (Selector(hosts=("web1", "db.main"), states=("FATAL",)), ("proc.web1.*.*.FATAL", "proc.db%2Emain.*.*.FATAL")),
        (Selector(hosts=("web*",), states=("FATAL",)), ("proc.*.*.*.FATAL",)),
        (Selector(hosts=("web1",), programs=("g:p",), states=("BACKOFF",)), ("proc.web1.g.p.BACKOFF",)),
        # Duplicates collapse: both programs need the same wildcard binding.
        (Selector(programs=("a*", "b?", "*"), states=("FATAL",)), ("proc.*.*.*.FATAL",)),
        (Selector(), tuple(f"proc.*.*.*.{s}" for s in STATES)),
    ],
)
def test_selector_bindings(selector: Selector, bindings: tuple[str, ...]) -> None:
    assert selector.bindings() == bindings


def test_every_binding_is_five_words() -> None:
    selector = Selector(programs=("g.1:p*", "x"), hosts=("h.1", "h*"), states=("FATAL", "EXITED"))
    for binding in selector.bindings():
        assert len(split_key(binding)) == 5, binding


@pytest.mark.parametrize(
    ("programs", "event", "accepted"),
    [
        (("group1:prog2",), ev(group="group1", process="prog2"), True),
        (("group1:prog2",), ev(group="group2", process="prog2"), False),
        (("group1:prog2",), ev(group="group1", process="prog3"), False),
        (("name",), ev(group="anygroup", process="name"), True),
        (("name",), ev(group="name", process="other"), False),
        (("worker_*",), ev(process="worker_03"), True),
        (("worker_*",), ev(process="xworker_03"), False),
        (("worker_?",), ev(process="worker_1"), True),
        (("worker_?",), ev(process="worker_10"), False),
        (("db.*",), ev(process="db.main"), True),
        (("db.*",), ev(process="dbXmain"), False),
        (("grp*:prog",), ev(group="grp-a", process="prog"), True),
        (("grp*:prog",), ev(group="other", process="prog"), False),
        (("*",), ev(group="g", process="p"), True),
        (("Worker_*",), ev(process="worker_03"), False),
    ],
)
def test_selector_accepts_globs_inside_words(programs: tuple[str, ...], event: Event, accepted: bool) -> None:
    selector = Selector(programs=programs, states=STATES)
    assert selector.accepts(event) is accepted
    # Whatever the residual filter accepts, the broker must have delivered: some binding matches its key.
    if accepted:
        key = event_key(event.host, event.group, event.process, event.state)
        assert any(topic_matches(b, key) for b in selector.bindings())


def test_selector_hosts_and_states() -> None:
    selector = Selector(hosts=("web*",), states=("FATAL", "EXITED"))
    assert selector.accepts(ev(host="web2", state="FATAL"))
    assert not selector.accepts(ev(host="db1", state="FATAL"))
    assert not selector.accepts(ev(host="web2", state="RUNNING"))


@pytest.mark.parametrize(
    ("state", "expected", "accepted"),
    [("EXITED", True, False), ("EXITED", False, True), ("EXITED", None, True),
     ("FATAL", None, True), ("BACKOFF", None, True), ("STOPPED", None, True)],
)
def test_unexpected_only_drops_only_expected_exits(state: str, expected: bool | None, accepted: bool) -> None:
    event = Event(host="h", group="g", process="p", event=f"PROCESS_STATE_{state}", state=state, expected=expected)
    assert Selector(unexpected_only=True).accepts(event) is accepted
    assert Selector(unexpected_only=False).accepts(event) is True


def test_subscription_defaults_are_crashmail_like() -> None:
    sub = Subscription.model_validate({"name": "crashes", "to": ["a@example.com"]})
    assert sub.bindings() == ("proc.*.*.*.EXITED", "proc.*.*.*.FATAL")
    assert sub.accepts(ev(state="EXITED", expected=False))
    assert not sub.accepts(ev(state="EXITED", expected=True))
    assert sub.accepts(ev(state="FATAL"))
    assert not sub.accepts(ev(state="RUNNING"))


def test_subscription_patterns_replace_selectors() -> None:
    sub = Subscription.model_validate(
        {"name": "raw", "to": ["a@example.com"], "patterns": ["proc.db%2Emain.#"], "unexpected_only": False}
    )
    assert sub.bindings() == ("proc.db%2Emain.#",)
    assert sub.accepts(ev(host="db.main", state="RUNNING"))
    assert sub.accepts(ev(host="db.main", state="EXITED", expected=True))


def test_subscription_states_star_means_all() -> None:
    sub = Subscription.model_validate({"name": "all", "to": ["a@example.com"], "states": ["*"]})
    assert sub.states == STATES


# -- key fields ----------------------------------------------------------------------------


def test_key_fields_decodes_a_key() -> None:
    key = event_key("db.main", "grüppe", "worker 3", "FATAL")
    assert key_fields(key) == KeyFields("db.main", "grüppe", "worker 3", "FATAL")
    assert key_fields("proc.web1.workers.worker_03.FATAL") == KeyFields("web1", "workers", "worker_03", "FATAL")
    assert key_fields("proc.web1.workers.worker_03.FATAL").expected is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "key",
    ["", "proc", "proc.a.b.c", "proc.a.b.c.d.e", "other.a.b.c.FATAL", "proc.a.b.%ZZ.FATAL",
     event_key("h", "g", "p" * 200, "FATAL")],
)
def test_key_fields_none_for_other_keys(key: str) -> None:
    assert key_fields(key) is None


# -- supervisord's own lifecycle: sup.<host>.<STATE> ----------------------------------------


def test_supervisor_key_encodes_the_host() -> None:
    assert supervisor_key("web1", "RUNNING") == "sup.web1.RUNNING"
    assert supervisor_key("db.main #2", "STOPPING") == "sup.db%2Emain%20%232.STOPPING"


def test_key_fields_decodes_a_sup_key() -> None:
    assert key_fields(supervisor_key("db.main", "STOPPING")) == KeyFields("db.main", "", "", "STOPPING")


@pytest.mark.parametrize("key", ["sup", "sup.web1", "sup.web1.RUNNING.x", "sup.w%Z1.RUNNING",
                                 supervisor_key("h" * 200, "RUNNING")])
def test_key_fields_none_for_bad_sup_keys(key: str) -> None:
    assert key_fields(key) is None


def test_sup_keys_reach_sup_patterns_and_no_process_selector() -> None:
    key = supervisor_key("web1", "RUNNING")
    assert topic_matches("sup.#", key) and topic_matches("sup.*.RUNNING", key)
    assert not topic_matches("proc.#", key)
    everything = Selector(states=STATES)
    assert not any(topic_matches(b, key) for b in everything.bindings())
    sub = Subscription.model_validate({"name": "lifecycle", "to": ["a@example.com"], "patterns": ["sup.*.*"]})
    fields = key_fields(key)
    assert fields is not None and sub.accepts(fields)
