"""A guest's console reaches the owner's terminal: it must not be able to drive it."""

from __future__ import annotations

from node.cli.common import terminal_safe


def test_escape_sequences_from_a_guest_are_shown_not_obeyed() -> None:
    hostile = "ok\r\nline \x1b]0;owned\x07 \x1b[2J \u009b31m \u202egnp.exe\tend\n"
    shown = terminal_safe(hostile)
    assert shown == "ok\nline \\x1b]0;owned\\x07 \\x1b[2J \\x9b31m \\u202egnp.exe\tend\n"
    assert not any(ord(ch) < 0x20 and ch not in "\n\t" for ch in shown)


def test_plain_text_and_other_scripts_pass_unchanged() -> None:
    text = "résultat: 42 — 完了\n\tindented\n"
    assert terminal_safe(text) == text
