"""protocols.text.printable: untrusted text as one bounded, escaped line."""

from __future__ import annotations

from protocols.text import MAX_CHARS, printable


def test_control_characters_are_escaped() -> None:
    assert printable("a\nb\rc\x00d\x1b[31m") == "a\\nb\\rc\\x00d\\x1b[31m"


def test_long_text_is_cut_and_says_how_much_was_dropped() -> None:
    out = printable("z" * (MAX_CHARS + 1234))
    assert out == "z" * MAX_CHARS + "... (1234 more characters)"


def test_plain_text_is_unchanged() -> None:
    assert printable("refused global model: base_mismatch (été)") == "refused global model: base_mismatch (été)"
