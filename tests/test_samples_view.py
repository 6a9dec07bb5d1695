"""`zopro status --samples`: real answers (long, several lines, unicode, markup) shown whole and safely."""

from __future__ import annotations

from rich.console import Console

from engine.cli.samples_view import samples_view, visible


def test_control_characters_become_visible_but_lines_and_unicode_stay():
    text = "Great café ☕ — 10/10.\nWould go again!\x1b[2J\rdone\x07"
    shown = visible(text)
    assert "\x1b" not in shown and "\r" not in shown and "\x07" not in shown
    assert "␛[2J" in shown and "␍done" in shown and "␇" in shown
    assert shown.startswith("Great café ☕ — 10/10.\nWould go again!")


def test_every_line_of_a_long_answer_is_printed():
    answer = (
        "First line about the soup.\n" + " ".join(["rich"] * 60) + "\n<b>markup</b> stays as text [bold]x[/]"
    )
    console = Console(width=60, record=True, color_system=None)
    console.print(
        samples_view(
            [
                {
                    "prompt": "How was the soup?",
                    "response": answer,
                    "score": 0.5,
                    "gold": 0.7,
                    "iteration": 2,
                    "kind": "eval",
                }
            ],
            5,
        )
    )
    out = console.export_text()
    assert "First line about the soup." in out
    assert out.count("rich") == 60
    assert "<b>markup</b> stays as text [bold]x[/]" in out  # not read as rich markup
    assert "eval sample, iteration 3" in out  # the file's iteration 2, read from 1 and "gold 0.70" in out


def test_no_samples_says_when_they_come():
    console = Console(width=80, record=True, color_system=None)
    console.print(samples_view([], 3))
    assert "written after the first evaluation" in console.export_text()


def test_the_tui_samples_table_keeps_a_multi_line_answer_on_one_readable_line():
    from zopro_tui.widgets.text import printable

    answer = "The hotel was lovely.\n\n- clean rooms\n- kind staff\x1b[31m\tand   a café ☕"
    shown = printable(answer)
    assert shown == "The hotel was lovely. ⏎ - clean rooms ⏎ - kind staff·[31m and a café ☕"
    assert len(printable("word " * 200)) == 400
