"""Stop strings: what a client sees is cut at the first stop string, however the text was chunked."""

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.stop import StopMatcher


def run(stop, deltas, include=False):
    matcher = StopMatcher(stop, include_stop_str_in_output=include)
    out = [matcher.feed(d) for d in deltas]
    if not matcher.finished:
        out.append(matcher.flush())
    return "".join(out), matcher.matched, out


def reference(text, stops, include):
    """Whole-text answer: the stop string that completes first (ties: the longest)."""
    best = None
    for s in stops:
        i = text.find(s)
        if s and i >= 0 and (best is None or (i + len(s), i) < (best[0] + len(best[1]), best[0])):
            best = (i, s)
    if best is None:
        return text, None
    i, s = best
    return (text[: i + len(s)] if include else text[:i]), s


def test_truncates_before_the_stop_string():
    text, matched, _ = run(["\n\n"], ["Hello", " world\n", "\nmore"])
    assert text == "Hello world"
    assert matched == "\n\n"


def test_includes_the_stop_string_when_asked():
    text, matched, _ = run(["STOP"], ["abc ST", "OP def"], include=True)
    assert text == "abc STOP"
    assert matched == "STOP"


def test_holds_back_only_a_possible_start_and_releases_it_when_broken():
    matcher = StopMatcher(["abc"])
    assert matcher.feed("xxab") == "xx"
    assert matcher.feed("d") == "abd"
    assert matcher.flush() == ""
    assert matcher.matched is None


def test_held_text_is_released_at_the_end():
    matcher = StopMatcher(["</answer>"])
    assert matcher.feed("42</ans") == "42"
    assert matcher.flush() == "</ans"


def test_nothing_after_a_match():
    matcher = StopMatcher(["."])
    assert matcher.feed("One. Two.") == "One"
    assert matcher.feed("Three") == ""
    assert matcher.flush() == ""
    assert matcher.finished


def test_the_stop_string_that_completes_first_wins():
    # "bc" completes before "abcd" would: a char-by-char stream stops there too.
    assert run(["abcd", "bc"], ["abcd"])[:2] == ("a", "bc")
    assert run(["ab", "abc"], ["abc"])[:2] == ("", "ab")


def test_multibyte_stop_string_split_across_deltas():
    text, matched, _ = run(["→end"], ["x →", "en", "d tail"])
    assert (text, matched) == ("x ", "→end")


def test_no_stop_strings_pass_text_through():
    assert run([], ["a", "b"])[0] == "ab"


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab€c", max_size=30),
    stops=st.lists(st.text(alphabet="ab€c", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=8),
    include=st.booleans(),
)
def test_any_chunking_gives_the_whole_text_answer(text, stops, cuts, include):
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    got, matched, _ = run(stops, deltas, include)
    assert (got, matched) == reference(text, stops, include)
