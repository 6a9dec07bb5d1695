"""`zopro queue`: bad entries refused before anything is queued; order and cancel of pending entries."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.rundir.queue import QueueError, add, cancel, load_items, move, queue_dir
from tests.conftest import zopro


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "trainn.iterations=1"], "trainn is not a known section"),
        (["--grid", "rloo.lr=1,abc"], "--grid rloo.lr: .*must be a number"),
        (["--set", "seed"], "--set 'seed' has no '='"),
    ],
)
def test_bad_entries_are_refused_and_nothing_is_queued(fast_recipe: Path, tmp_path: Path, args, message):
    import re

    root = tmp_path / "runs"
    result = zopro("queue", "add", str(fast_recipe), "--root", str(root), *args)
    assert result.returncode == 2
    assert re.search(message, " ".join(result.stderr.split())), result.stderr
    assert not root.exists()


def test_unknown_entries_are_named(tmp_path: Path):
    result = zopro("queue", "cancel", "7", "--root", str(tmp_path))
    assert result.returncode == 2 and "no queue entry '7'" in result.stderr
    result = zopro("queue", "move", "7", "sideways", "--root", str(tmp_path))
    assert result.returncode == 2


def test_pending_entries_move_and_cancel(fast_recipe: Path, tmp_path: Path):
    root = tmp_path / "runs"
    for seed in (1, 2, 3):  # queued in the library: no worker is started here
        add(root, fast_recipe, [f"seed={seed}"], [])
    assert [i.id for i in load_items(root)] == ["0001", "0002", "0003"]
    move(root, "0003", "first")
    assert [i.id for i in load_items(root)] == ["0003", "0001", "0002"]
    move(root, "1", "down")
    assert [i.id for i in load_items(root)] == ["0003", "0002", "0001"]
    cancel(root, "0002")
    assert {i.id: i.state for i in load_items(root)}["0002"] == "cancelled"
    with pytest.raises(QueueError, match="only pending entries move"):
        move(root, "0002", "up")
    with pytest.raises(QueueError, match="already cancelled"):
        cancel(root, "0002")
    assert (queue_dir(root) / "recipes" / "0001.toml").read_text() == fast_recipe.read_text()
    listed = zopro("queue", "ls", "--root", str(root))
    assert listed.returncode == 0 and "cancelled" in listed.stdout and "worker: idle" in listed.stdout
