"""`StopFilter`: text held back while it could begin a stop string, cut at the first one."""

from __future__ import annotations

from mistol.stops import StopFilter


def feed(stops, pieces) -> tuple[list[str], str, bool]:
    f = StopFilter(stops)
    shown = [f.push(p) for p in pieces]
    return shown, f.flush(), f.stopped


def test_a_stop_string_split_across_pieces_never_shows():
    shown, rest, stopped = feed(["</answer>"], ["The sum is 4", "</ans", "wer> and more"])
    assert shown == ["The sum is 4", "", ""] and rest == "" and stopped


def test_a_piece_that_begins_a_stop_and_then_does_not_is_released():
    shown, rest, stopped = feed(["STOP"], ["ab S", "T", "x", "yz"])
    assert shown == ["ab ", "", "STx", "yz"] and rest == "" and not stopped


def test_several_stops_cut_at_the_first_in_the_text():
    shown, rest, stopped = feed(["\n\n", "User:", "xyz"], ["Hi there.", " User: hi\n\nmore"])
    assert "".join(shown) == "Hi there. " and stopped
    # the longest possible start is held: "Us" could begin "User:", "x" could begin "xyz"
    assert feed(["User:", "xyz"], ["a Us"])[0] == ["a "]
    assert feed(["User:", "xyz"], ["a x"])[0] == ["a "]


def test_final_flush_gives_what_was_held_back():
    shown, rest, stopped = feed(["<|end|>"], ["done <|e"])
    assert shown == ["done "] and rest == "<|e" and not stopped


def test_without_stops_everything_passes_and_after_a_stop_nothing_does():
    assert feed([], ["a", "b"]) == (["a", "b"], "", False)
    assert feed([""], ["a"]) == (["a"], "", False)  # an empty stop string is no stop
    shown, rest, stopped = feed(["X"], ["aXb", "c"])
    assert shown == ["a", ""] and rest == "" and stopped


def test_a_stop_at_the_very_start():
    assert feed(["ab"], ["a", "b"]) == (["", ""], "", True)
