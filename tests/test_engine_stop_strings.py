"""Stop strings across delta boundaries, checked against a plain search on the text streamed so far."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given

from inference_service.engine.stop_strings import StopStringMatcher


def run(deltas, stops):
    m = StopStringMatcher(stops)
    out = []
    for d in deltas:
        text, stopped = m.feed(d)
        out.append(text)
        if stopped:
            return "".join(out), True, out
    out.append(m.flush())
    return "".join(out), False, out


def oracle(deltas, stops):
    """A plain search on the text streamed so far, after each delta: generation stops at the
    first delta that completes a stop string (a longer stop that began earlier but would only
    complete later does not count — the stream has ended by then)."""
    text = ""
    for d in deltas:
        text += d
        hits = [text.find(s) for s in stops if s and s in text]
        if hits:
            return text[: min(hits)], True
    return text, False


def test_stop_split_over_deltas_is_never_leaked():
    text, stopped, parts = run(["Hello wo", "rld<", "|e", "nd|> more"], ["<|end|>"])
    assert stopped and text == "Hello world"
    assert "<" not in "".join(parts)  # the partial "<" and "<|e" were held back, not sent


def test_false_alarm_is_released():
    text, stopped, parts = run(["a<", "b", "c"], ["<|end|>"])
    assert not stopped and text == "a<bc"
    assert parts[0] == "a"  # "<" held until the next delta proved harmless


def test_earliest_of_several_stops_wins():
    assert run(["xx STOP yy END"], ["END", "STOP"])[:2] == ("xx ", True)


@given(
    st.lists(st.text(alphabet="ab<>|", max_size=6), max_size=8),
    st.lists(st.text(alphabet="ab<>|", min_size=1, max_size=4), max_size=3),
)
def test_matches_search_on_joined_text(deltas, stops):
    text, stopped, _ = run(deltas, stops)
    assert (text, stopped) == oracle(deltas, stops)
