"""Nothing in a run, sweep or queue folder makes zopro read, copy, show or load a file from elsewhere, write
through a link it finds there, or hang on a FIFO where a file belongs (docs/safety.md, "Reading"). Each
folder here is someone else's run with links planted in it; the victims live outside it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from engine.jobs import queue
from tests.conftest import FAST_RECIPE, zopro
from tests.runs import finished_run

REPO = Path(__file__).resolve().parents[1]
FIXTURE_RUN = REPO / "tests" / "fixtures" / "run_tiny" / "fast-seed0"
SECRET = "SECRET-KEY-MATERIAL-not-for-a-report"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run with checkpoints (one iteration): (recipe, run directory)."""
    one_iteration = FAST_RECIPE.replace("iterations = 2", "iterations = 1")
    return finished_run(tmp_path_factory.mktemp("source"), "fast", one_iteration)


def copied(run: Path, where: Path) -> Path:
    where.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(run, where, symlinks=True)
    return where


def victim_file(tmp_path: Path, name: str = "id_rsa", text: str = SECRET + "\n") -> Path:
    victim = tmp_path / "victim"
    victim.mkdir(exist_ok=True)
    (victim / name).write_text(text)
    return victim / name


def fifo(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path)


def one_sentence(result, *words: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


# -- reading: a report shows nothing from outside ----------------------------------------------------------------
def test_a_report_copies_no_linked_recipe_or_samples_from_elsewhere(tmp_path):
    run = copied(FIXTURE_RUN, tmp_path / "runs" / "r")
    (run / "recipe.toml").unlink()
    (run / "recipe.toml").symlink_to(victim_file(tmp_path))
    rows = [{"kind": "eval", "iteration": 9, "prompt": SECRET, "response": SECRET, "score": 1.0, "gold": 1.0}]
    outside = victim_file(tmp_path, "notes.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n")
    (run / "samples" / "samples-99999999.jsonl").symlink_to(outside)
    result = zopro("report", str(run), "-o", str(tmp_path / "r.md"))
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "r.md").read_text()
    assert SECRET not in report
    assert "recipe.toml cannot be read" in report


def test_a_linked_samples_folder_is_not_read(tmp_path):
    from engine.rundir.answers import evaluation_answers

    run = copied(FIXTURE_RUN, tmp_path / "runs" / "r")
    assert evaluation_answers(run), "the fixture has held-out answers"
    shutil.move(run / "samples", tmp_path / "elsewhere")
    (run / "samples").symlink_to(tmp_path / "elsewhere")
    assert evaluation_answers(run) == {}


# -- reading: a checkpoint that is a link, or holds one, is never loaded -------------------------------------------
def test_export_refuses_a_linked_checkpoint_and_one_with_a_link_inside(tmp_path, finished):
    _, source = finished
    run = copied(source, tmp_path / "r1")
    elsewhere = tmp_path / "victim" / "ckpt"
    shutil.copytree(run / "checkpoints" / "iter-0000", elsewhere)
    shutil.rmtree(run / "checkpoints" / "iter-0000")
    (run / "checkpoints" / "iter-0000").symlink_to(elsewhere)
    result = zopro("export", str(run), "--model", str(tmp_path / "out1"), "--checkpoint", "iter-0")
    assert result.returncode == 2, result.stdout + result.stderr
    one_sentence(result, "iter-0")
    assert not (tmp_path / "out1").exists()

    run = copied(source, tmp_path / "r2")
    adapter = run / "checkpoints" / "iter-0000" / "adapters" / "policy"
    shutil.move(adapter, tmp_path / "victim" / "policy")
    adapter.symlink_to(tmp_path / "victim" / "policy")
    result = zopro("export", str(run), "--model", str(tmp_path / "out2"), "--checkpoint", "iter-0")
    assert result.returncode == 2, result.stdout + result.stderr
    one_sentence(result, "symbolic link")
    assert not (tmp_path / "out2").exists()


def test_a_checkpoint_with_a_link_inside_is_not_resumed_from(tmp_path, finished):
    from engine.rundir.safe_io import plain_tree
    from engine.training.run import CheckpointUnreadable, Run

    _, source = finished
    run = copied(source, tmp_path / "r")
    state = run / "checkpoints" / "iter-0000" / "state.json"
    shutil.move(state, tmp_path / "state.json")
    state.symlink_to(tmp_path / "state.json")
    with pytest.raises(OSError, match="link"):
        plain_tree(state.parent)
    with pytest.raises(CheckpointUnreadable, match="state.json"):
        Run.load_checkpoint(object.__new__(Run), state.parent)  # refused before anything is read


def test_the_interplay_report_skips_a_linked_checkpoint(tmp_path, finished):
    from engine.export.interplay_report import list_checkpoints

    _, source = finished
    run = copied(source, tmp_path / "r")
    names = [name for name, _ in list_checkpoints(run)[0]]
    assert names == ["reward", "iter-0000"]
    shutil.move(run / "checkpoints" / "iter-0000", tmp_path / "elsewhere")
    (run / "checkpoints" / "iter-0000").symlink_to(tmp_path / "elsewhere")
    assert [name for name, _ in list_checkpoints(run)[0]] == ["reward"]


def test_stages_from_copies_nothing_through_a_linked_checkpoints_or_samples_folder(tmp_path, finished):
    recipe, source = finished
    run = copied(source, tmp_path / "s")
    shutil.move(run / "checkpoints", tmp_path / "victim-checkpoints")
    (run / "checkpoints").symlink_to(tmp_path / "victim-checkpoints")
    result = zopro("run", str(recipe), "--stages-from", str(run), "--run-dir", str(tmp_path / "n"), "-q")
    assert result.returncode == 2, result.stdout + result.stderr
    one_sentence(result, "--stages-from")

    run = copied(source, tmp_path / "s2")
    reward_step = json.loads((run / "checkpoints" / "reward" / "state.json").read_text())["global_step"]
    adoptable = {p.name for p in (run / "samples").iterdir() if int(p.stem.split("-")[1]) <= reward_step}
    assert adoptable, "the source has samples from before its reward checkpoint"
    shutil.move(run / "samples", tmp_path / "victim-samples")
    (run / "samples").symlink_to(tmp_path / "victim-samples")
    result = zopro("run", str(recipe), "--stages-from", str(run), "--run-dir", str(tmp_path / "n2"), "-q")
    assert result.returncode == 0, result.stderr
    assert adoptable.isdisjoint(p.name for p in (tmp_path / "n2" / "samples").iterdir())


def test_meta_json_cannot_point_export_at_a_model_elsewhere(tmp_path, finished):
    from engine.data.tasks import make_task
    from engine.export.run_model import run_base, run_recipe

    _, source = finished
    run = copied(source, tmp_path / "r")
    private = tmp_path / "victim" / "private-model"
    private.mkdir(parents=True)
    (private / "config.json").write_text("{}")
    meta = json.loads((run / "meta.json").read_text())
    honest = meta["base"]
    meta["base"] = str(private)
    (run / "meta.json").write_text(json.dumps(meta))
    recipe = run_recipe(run)
    task = make_task(recipe)
    assert run_base(run, recipe, task) == honest, "resolved again from the recipe: the cached built-in base"
    meta["base"] = honest
    (run / "meta.json").write_text(json.dumps(meta))
    assert run_base(run, recipe, task) == honest


# -- no hang: a FIFO where a file belongs ---------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["checkpoints/latest", "meta.json", "recipe.toml"])
def test_a_fifo_in_a_run_folder_is_one_sentence_not_a_hang(tmp_path, finished, where):
    _, source = finished
    run = copied(source, tmp_path / "r")
    fifo(run / where)
    result = zopro("export", str(run), "--model", str(tmp_path / "out"), timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    if where == "recipe.toml":
        assert result.returncode == 2
        one_sentence(result, "recipe.toml")
    else:  # the latest checkpoint by its folders, the base by the recipe: the export goes on
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "out" / "adapter_config.json").is_file()
    result = zopro("report", str(run), "-o", str(tmp_path / "r.md"), timeout=120)
    assert "Traceback" not in result.stderr and result.returncode in (0, 2), result.stderr


def test_a_fifo_among_the_samples_is_skipped(tmp_path):
    from engine.rundir.answers import evaluation_answers

    run = copied(FIXTURE_RUN, tmp_path / "r")
    before = evaluation_answers(run)
    fifo(run / "samples" / "samples-99999999.jsonl")
    assert returns_within(20, lambda: evaluation_answers(run)) == before


# -- writing: no link in the queue's root or the TUI's export folder is written through --------------------------
def test_a_queue_entry_whose_run_folder_is_a_link_is_never_run_into(tmp_path, monkeypatch):
    root = tmp_path / "q"
    recipe = tmp_path / "fast.toml"
    recipe.write_text(FAST_RECIPE)
    monkeypatch.setattr(queue, "start_worker", lambda root: None)
    item = queue.add(root, recipe, [], [])
    victim = tmp_path / "victim"
    victim.mkdir()
    Path(item.target).symlink_to(victim, target_is_directory=True)
    damaged: list[str] = []
    assert queue.load_items(root, damaged) == [] and "symbolic link" in damaged[0]
    logged: list[str] = []
    queue._run_item(root, item, logged.append)  # the link came after the worker read the entry
    assert list(victim.iterdir()) == []
    assert "symbolic link" in logged[-1] and "not run" in logged[-1]


async def test_the_tuis_metrics_export_replaces_a_link_instead_of_writing_through_it(tmp_path):
    from tests.test_tui import wait_for
    from zopro_tui.app import ZoproApp
    from zopro_tui.screens.dashboard import DashboardScreen

    bashrc = victim_file(tmp_path, "bashrc", "export PATH=/usr/bin\n")
    export = tmp_path / "exports"
    export.mkdir()
    (export / "fast-seed0-metrics.csv").symlink_to(bashrc)
    app = ZoproApp(FIXTURE_RUN.parent, attach=FIXTURE_RUN, export_dir=export)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), 5, "the dashboard")
        await pilot.press("E")
        await wait_for(pilot, lambda: (export / "fast-seed0-metrics.json").exists(), 10, "the export")
    assert bashrc.read_text() == "export PATH=/usr/bin\n"
    assert not (export / "fast-seed0-metrics.csv").is_symlink()


# -- showing: the TUI's log panel and `zopro ls` --------------------------------------------------------------------
def test_the_tui_shows_no_linked_launch_log(tmp_path):
    from zopro_tui.reading import RunReader

    run = copied(FIXTURE_RUN, tmp_path / "root" / "r")
    (run.parent / "r.log").symlink_to(victim_file(tmp_path))
    assert RunReader(run).read_log() is None
    (run.parent / "r.log").unlink()
    (run.parent / "r.log").write_text("started\n")
    assert RunReader(run).read_log().lines == ["started"]


def test_ls_shows_a_run_name_as_written_never_as_markup_or_terminal_codes(tmp_path):
    root = tmp_path / "runs"
    copied(FIXTURE_RUN, root / "[blink]mk")
    copied(FIXTURE_RUN, root / "x\x1b]0;PWNED\x07y")
    result = zopro("ls", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert "[blink]mk" in result.stdout
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout and "x?]0;PWNED?y" in result.stdout


def returns_within(seconds: float, call) -> object:
    """`call()`'s result; fails (instead of hanging the suite) when it takes longer than `seconds`."""
    import threading

    box: list = []
    thread = threading.Thread(target=lambda: box.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return box[0]


def test_status_shows_no_samples_from_a_linked_samples_folder(tmp_path):
    run = copied(FIXTURE_RUN, tmp_path / "r")
    elsewhere = tmp_path / "victim" / "notes"
    elsewhere.mkdir(parents=True)
    row = {"kind": "rollout", "iteration": 0, "prompt": SECRET, "response": SECRET, "score": 1.0}
    (elsewhere / "samples-99999999.jsonl").write_text(json.dumps(row) + "\n")
    shutil.rmtree(run / "samples")
    (run / "samples").symlink_to(elsewhere)
    result = zopro("status", str(run), "--samples", "1")
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout


def test_resume_takes_no_checkpoint_from_a_linked_checkpoints_folder(tmp_path, finished):
    from engine.rundir.checkpoints import checkpoint_candidates

    _, source = finished
    run = copied(source, tmp_path / "r")
    assert checkpoint_candidates(run)
    shutil.move(run / "checkpoints", tmp_path / "other-checkpoints")
    (run / "checkpoints").symlink_to(tmp_path / "other-checkpoints")
    assert checkpoint_candidates(run) == []


def test_the_zeroth_order_adapter_history_reads_no_fifo_or_link(tmp_path, finished):
    from engine.training.adapter_history import AdapterHistory

    _, source = finished
    run = copied(source, tmp_path / "r")
    checkpoint = run / "checkpoints" / "iter-0000"
    history = AdapterHistory(keep=2)
    history.read_checkpoint(0, checkpoint)
    assert 0 in history.boundaries, "a plain checkpoint is read"
    fifo(checkpoint / "adapters" / "policy" / "adapter_model.safetensors")
    history = AdapterHistory(keep=2)
    returns_within(20, lambda: history.read_checkpoint(0, checkpoint))
    assert 0 not in history.boundaries


def test_resume_and_sweep_resume_train_no_recipe_linked_from_elsewhere(tmp_path, finished):
    from engine.jobs.sweep import create_sweep

    _, source = finished
    run = copied(source, tmp_path / "r")
    status = json.loads((run / "status.json").read_text())
    status["state"] = "stopped"
    (run / "status.json").write_text(json.dumps(status))
    (run / "recipe.toml").unlink()
    (run / "recipe.toml").symlink_to(victim_file(tmp_path, "private.toml", "token = 'SECRET-KEY-x'\n"))
    result = zopro("run", "--resume", str(run), "-q")
    assert result.returncode == 2, result.stdout + result.stderr
    one_sentence(result, "recipe.toml", "symbolic link")
    assert "SECRET" not in result.stderr + result.stdout

    recipe = tmp_path / "fast.toml"
    recipe.write_text(FAST_RECIPE)
    sweep = create_sweep(recipe, ["reward.lr=0.001,0.002"], [], root=tmp_path, sweep_dir=tmp_path / "sw")
    sweep.recipe.unlink()
    sweep.recipe.symlink_to(tmp_path / "victim" / "private.toml")
    result = zopro("sweep", "--resume", str(sweep.path), "-q")
    assert result.returncode == 2, result.stdout + result.stderr
    one_sentence(result, "recipe.toml", "symbolic link")
    assert not list((tmp_path / "sw").glob("*/events.jsonl")), "no point ran"
