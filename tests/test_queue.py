"""`zopro queue`: bad entries refused before anything is queued; order and cancel of pending entries."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.jobs.queue import QueueError, add, cancel, load_items, move, queue_dir
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
    assert move(root, "0003", "first")[1:] == (1, 3)  # its place in line, of how many
    assert [i.id for i in load_items(root)] == ["0003", "0001", "0002"]
    assert move(root, "1", "down")[1:] == (3, 3)
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


@pytest.mark.parametrize("when", ["loading", "policy"])
def test_cancelling_the_running_entry_stops_it_at_a_checkpoint_and_the_queue_goes_on(
    fast_recipe: Path, tmp_path: Path, when: str
):
    """`zopro queue cancel` on the entry that runs, while its model loads or in its first policy iteration:
    the run stops (checkpoint, `stopped`, resumable) and the worker starts the next entry."""
    import time

    from engine.rundir.checkpoints import latest_checkpoint
    from engine.rundir.reader import read_events, run_info
    from tests.conftest import zopro_popen

    root = tmp_path / "runs"
    first = add(root, fast_recipe, ["seed=1", "train.iterations=6"], [])  # long enough to be caught running
    second = add(root, fast_recipe, ["seed=2", "train.iterations=1"], [])
    worker = zopro_popen("queue", "work", "--root", str(root))  # the worker `queue add` would start, watched
    target = Path(first.target)

    def reached() -> bool:
        if when == "loading":  # the worker has started it: its process is still importing torch
            return next(i for i in load_items(root) if i.id == first.id).pid is not None
        return (target / "status.json").exists() and run_info(target).stage == "policy"

    try:
        deadline = time.monotonic() + 240
        while not reached() and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.05)
        assert reached(), worker.stderr.read() if worker.poll() is not None else "not reached in time"
        result = zopro("queue", "cancel", first.id, "--root", str(root))
        assert result.returncode == 0, result.stderr
        worker.wait(timeout=400)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    items = {item.id: item for item in load_items(root)}
    assert items[first.id].state == "cancelled" and items[first.id].exit_code == 143
    assert items[second.id].state == "finished" and items[second.id].started >= items[first.id].ended
    info = run_info(target)
    assert info.status == "stopped" and (info.iteration or 0) < 5
    assert latest_checkpoint(target) is not None
    assert read_events(target)[-1]["type"] == "run_end" and read_events(target)[-1]["status"] == "stopped"
    assert run_info(Path(second.target)).status == "finished"
