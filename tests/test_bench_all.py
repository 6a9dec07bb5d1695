"""`zopro bench all`: every figure the README quotes from one command, into docs/figures.json and .md."""

from __future__ import annotations

import hashlib
import json

import pytest

from bench.all import PIECES
from bench.figures_md import TITLES, update_readme
from tests.conftest import REPO, zopro


def readme_digest() -> str:
    return hashlib.sha256((REPO / "README.md").read_bytes()).hexdigest()


@pytest.mark.slow
def test_quick_mode_runs_every_piece_and_writes_dated_figures(tmp_path):
    before = readme_digest()
    result = zopro("bench", "all", "--quick", "--out", str(tmp_path), timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["quick"] is True and len(figures["commit"]) == 40 and figures["date"]
    assert list(figures["pieces"]) == list(PIECES)
    for name, entry in figures["pieces"].items():
        assert entry["quick"] is True and entry["date"] and entry["machine"]["cores"] >= 1, name
        assert entry["command"] and "error" not in entry and "result" in entry, (name, entry)
    trl = figures["pieces"]["trl"]["result"]["builtin:nano"]["result"]
    assert trl["settings"]["trl_gradient_checkpointing"] == [True, False]
    assert trl["sides"]["trl_gc_on"]["gradient_checkpointing"] is True  # read back from TRL's model
    assert trl["sides"]["trl_gc_off"]["gradient_checkpointing"] is False
    for side in ("zopro", "trl_gc_on", "trl_gc_off"):
        assert trl["sides"][side]["tokens_per_step"] > 0 and set(trl["sides"][side]["phases"]) == {
            "generation",
            "scoring",
            "update",
        }
    assert trl["sides"]["zopro_run"]["median_step_s"] > 0
    learning = figures["pieces"]["learning"]["result"]
    assert {row["method"] for row in learning["rows"]} == {"rloo", "mezo"}
    assert all(len(row["gold"]) == 3 for row in learning["rows"])  # SFT, iterations 0 and 1
    text = (tmp_path / "figures.md").read_text()
    for title, _ in TITLES.values():
        assert f"## {title}" in text
    assert "QUICK MODE" in text and figures["commit"][:12] in text
    assert readme_digest() == before  # quick figures never reach the README


def test_an_unknown_piece_is_one_sentence_and_writes_nothing(tmp_path):
    result = zopro("bench", "all", "--only", "trl,speed", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "unknown speed; accepted: demo, learning" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    docs = REPO / "docs" / "figures.json"
    before = docs.read_bytes() if docs.exists() else None
    result = zopro("bench", "all", "--quick", "--only", "trl")  # quick figures never go to docs/
    assert result.returncode == 2 and "--out DIR" in result.stderr
    assert (docs.read_bytes() if docs.exists() else None) == before


def test_the_readme_regions_take_the_figures_and_only_theirs():
    demo = {"wall_s": 31.4, "gold_sft": 0.234, "gold_final": 0.517, "gold_final_se": 0.015}
    figures = {
        "pieces": {
            "demo": {"date": "2026-12-07 10:00:00", "commit": "a" * 40, "result": {**demo, "cores": 2}},
            "methods": {"date": "2026-12-07 10:05:00", "error": "exit 1: out of memory"},
        }
    }
    text = (
        "on CPU; <!-- figures:demo -->old words<!-- /figures:demo -->).\n"
        "<!-- figures:methods -->\nby hand\n<!-- /figures:methods -->\n"
    )
    updated = update_readme(text, figures)
    assert (
        "<!-- figures:demo -->31 s on 2 cores, held-out gold 0.234 -> 0.517; measured 2026-12-07" in updated
    )
    assert "old words" not in updated
    assert "by hand" in updated  # a piece that failed leaves its region as it was
    figures["pieces"]["demo"]["result"]["wall_s_runs"] = [30.2, 31.4, 34.9]
    assert "<!-- figures:demo -->31 s (30-35 s over 3 runs) on 2 cores, held-out" in update_readme(
        text, figures
    )
    figures["pieces"]["demo"]["quick"] = True
    assert update_readme(text, figures) == text  # quick figures never reach the README


def test_only_a_change_outside_the_files_bench_all_writes_marks_the_code_uncommitted(tmp_path, monkeypatch):
    import subprocess

    import bench.all as bench_all

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True)

    (tmp_path / "docs").mkdir()
    for name in ("README.md", "docs/figures.json", "docs/figures.md", "engine.py"):
        (tmp_path / name).write_text("one\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "start")
    monkeypatch.setattr(bench_all, "ROOT", tmp_path)
    for name in ("README.md", "docs/figures.json", "docs/figures.md"):  # what a piece before this one wrote
        (tmp_path / name).write_text("two\n")
    assert bench_all.git_commit()["dirty"] is False and len(bench_all.git_commit()["commit"]) == 40
    (tmp_path / "engine.py").write_text("two\n")
    assert bench_all.git_commit()["dirty"] is True
