"""Several ranks for real: `torchrun --nproc-per-node 2` with the gloo backend on CPU, the real CLI, the
fast recipe. Two-process runs against one-process runs of the same global batch, control requests and
signals reaching both ranks, a lost rank, and exact resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from engine.rundir.controls import send_control
from engine.rundir.reader import apply_rewinds, read_events
from engine.training.distributed import Distributed
from tests.conftest import FAST_RECIPE, REPO, zopro

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in"),
]

ZO = ["--set", "policy.method=zopro", "--set", "zopro.first_iteration=mezo", "--set", "zopro.sampler=zopro"]


def torchrun_command(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] + [
        "-m",
        "engine.cli",
        *args,
    ]


def environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), **extra)
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(*args: str, cwd: Path, timeout: float = 400, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_command(*args),
        cwd=cwd,
        env=environment(**extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch(cwd: Path, recipe_path: Path, run_dir: Path, **extra: str) -> subprocess.Popen:
    """A 2-rank run started in the background, its output kept."""
    return subprocess.Popen(
        torchrun_command("run", str(recipe_path), "--run-dir", str(run_dir), "-q"),
        cwd=cwd,
        env=environment(**extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def recipe(folder: Path, **changes: str) -> Path:
    text = FAST_RECIPE
    for key, value in changes.items():
        text = text.replace(f"{key} = ", f"{key} = {value}  # was ", 1)
    path = folder / "fast.toml"
    path.write_text(text)
    return path


def adapters(checkpoint: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(checkpoint.rglob("*.safetensors")):
        for key, value in load_file(file).items():
            out[f"{file.relative_to(checkpoint)}:{key}"] = value.float()
    return out


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], part: str) -> float:
    keys = [k for k in a if k.startswith(part)]
    assert keys and set(keys) <= set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in keys)


def metric(run_dir: Path, name: str) -> list[float]:
    events = apply_rewinds(read_events(run_dir))
    return [e["metrics"][name] for e in events if name in (e.get("metrics") or {})]


def rewound_copy(run_dir: Path, to: Path) -> Path:
    """A copy of a finished run as it stood when its reward-model checkpoint was written."""
    shutil.copytree(run_dir, to)
    for folder in (to / "checkpoints").iterdir():
        if folder.is_dir() and folder.name not in ("sft", "reward"):
            shutil.rmtree(folder)
    (to / "checkpoints" / "latest").write_text("reward\n")
    status = json.loads((to / "status.json").read_text())
    status["state"] = "stopped"
    (to / "status.json").write_text(json.dumps(status))
    return to


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def in_policy_stage(run_dir: Path) -> bool:
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return False
    return status.get("stage") == "policy" and status.get("step", 0) >= 1


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    raise AssertionError(f"no process of rank {rank}")


@pytest.fixture(scope="module")
def one_rank_zopro(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("one-rank")
    done = zopro("run", str(recipe(folder)), "--run-dir", "zo", "-q", *ZO, cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder / "zo"


def test_zeroth_order_on_two_ranks_continues_like_one(one_rank_zopro, tmp_path):
    """From the same checkpoint, two ranks (each sampling and scoring half of every update's prompts,
    all-reducing only g) take the steps one process took: the same g sequence and adapters, to float
    tolerance (the two halves run through other matrix shapes than the whole batch)."""
    copy = rewound_copy(one_rank_zopro, tmp_path / "zo2")
    done = torchrun("run", "--resume", str(copy), "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    resume = [e for e in read_events(copy) if e["type"] == "resume"][-1]
    assert resume["world_size"] == 2 and resume["previous_world_size"] == 1
    assert "on 2 ranks where it ran on 1" in resume["message"]
    one, two = metric(one_rank_zopro, "zo/g_raw"), metric(copy, "zo/g_raw")
    assert len(one) == len(two) == 8
    assert two[:4] == pytest.approx(one[:4], rel=1e-2, abs=1e-3)  # iteration 0: the same reward model
    assert metric(copy, "dist/world_size")[-1] == 2
    # a zeroth-order update all-reduces q float64 scalars (g of each direction), never the adapter
    directions = json.loads(json.dumps(read_events(copy)[0]["recipe"]))["zopro"]["directions"]
    assert metric(copy, "dist/update_bytes") == [8.0 * directions] * 8
    first = adapters(one_rank_zopro / "checkpoints" / "iter-0000")
    second = adapters(copy / "checkpoints" / "iter-0000")
    assert max_difference(first, second, "adapters/policy") < 1e-5
    # one writer: every event once, in order
    seqs = [e["seq"] for e in apply_rewinds(read_events(copy))]
    assert seqs == sorted(set(seqs))


ROW_PROBES = [
    *("--set", "policy.method=zopro", "--set", "zopro.sampler=subspace", "--set", "zopro.probes=rows"),
    *("--set", "zopro.estimator=one_sided", "--set", "zopro.normalize_g=true", "--set", "zopro.lr=0.1"),
    *("--set", "zopro.eps=1e-2", "--set", "zopro.g_clip=3.0", "--set", "zopro.premise_check=false"),
]


@pytest.mark.parametrize("gradients", ["batch", "prompts"])
def test_row_probes_on_two_ranks_continue_like_one(tmp_path, gradients):
    """Row probes seed each row's direction by its index in the whole batch and sum the estimates over the
    ranks: two ranks, each probing half of the rows, take the steps one process took. With per-prompt
    snapshots the ranks gather each other's prompt gradients in rank order: the same basis as one process."""
    folder = tmp_path / "one"
    folder.mkdir()
    snapshots = ("--set", f"zopro.subspace_gradients={gradients}", "--set", "zopro.subspace_snapshots=64")
    done = zopro("run", str(recipe(folder)), "--run-dir", "zo", "-q", *ROW_PROBES, *snapshots, cwd=folder)
    assert done.returncode == 0, done.stderr
    copy = rewound_copy(folder / "zo", tmp_path / "zo2")
    done = torchrun("run", "--resume", str(copy), "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = metric(folder / "zo", "zo/g_raw"), metric(copy, "zo/g_raw")
    zeroth = [m for m in metric(copy, "zo/first_order")].count(0.0)
    assert zeroth == 4 and len(one) == len(two) == 4  # iteration 1: four zeroth-order updates
    assert two == pytest.approx(one, rel=1e-2, abs=1e-3)
    steps_one, steps_two = metric(folder / "zo", "zo/step_norm"), metric(copy, "zo/step_norm")
    assert steps_two == pytest.approx(steps_one, rel=1e-2) and all(x > 0 for x in steps_one)
    first = adapters(folder / "zo" / "checkpoints" / "iter-0001")
    second = adapters(copy / "checkpoints" / "iter-0001")
    assert max_difference(first, second, "adapters/policy") < 1e-4
    ranks = metric(copy, "zo/basis_rank")
    assert ranks == metric(folder / "zo", "zo/basis_rank") and ranks[0] > (4 if gradients == "prompts" else 0)


def test_rloo_on_two_ranks_continues_like_one(tmp_path):
    """RLOO with the gradients all-reduced (weighted by each rank's sequences): the policy after an
    iteration on two ranks is the one-process policy within 1e-4 (Adam divides small gradients by their
    own size, so rounding in the all-reduce shows at that level)."""
    done = zopro(
        "run", str(recipe(tmp_path)), "--run-dir", "one", "-q", "--set", "train.iterations=1", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    copy = rewound_copy(tmp_path / "one", tmp_path / "two")
    done = torchrun("run", "--resume", str(copy), "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    first = adapters(tmp_path / "one" / "checkpoints" / "iter-0000")
    second = adapters(copy / "checkpoints" / "iter-0000")
    assert max_difference(first, second, "adapters/policy") < 1e-4
    assert metric(copy, "objective/scores")[:4] == pytest.approx(
        metric(tmp_path / "one", "objective/scores")[:4], abs=1e-3
    )
    adapter_bytes = sum(v.numel() * 4 for k, v in second.items() if k.startswith("adapters/policy"))
    assert min(metric(copy, "dist/update_bytes")) >= adapter_bytes  # one float32 bucket per update


def test_two_ranks_stop_together_on_sigterm_to_one_and_resume_exactly(tmp_path):
    path = recipe(tmp_path)
    whole = torchrun("run", str(path), "--run-dir", "whole", "-q", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run_dir = tmp_path / "cut"
    launcher = launch(tmp_path, path, run_dir)
    try:
        wait_for(lambda: in_policy_stage(run_dir), 300, "the policy stage")
        rank_process(launcher, 1).send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=180)
    finally:
        launcher.kill()
    assert (run_dir / "checkpoints" / "resume" / "state.json").exists(), output[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["stopped_by"] == "SIGTERM"
    stopped_at = [e for e in read_events(run_dir) if e["type"] == "run_end"][-1]
    assert stopped_at["status"] == "stopped"
    done = torchrun("run", "--resume", str(run_dir), "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    whole_adapters = adapters(tmp_path / "whole" / "checkpoints" / "iter-0001")
    resumed = adapters(run_dir / "checkpoints" / "iter-0001")
    for key, value in whole_adapters.items():
        assert torch.equal(value, resumed[key]), key
    assert metric(run_dir, "eval/gold") == metric(tmp_path / "whole", "eval/gold")


def test_pause_and_stop_reach_both_ranks(tmp_path):
    run_dir = tmp_path / "run"
    launcher = launch(tmp_path, recipe(tmp_path), run_dir)
    try:
        wait_for(lambda: in_policy_stage(run_dir), 300, "the policy stage")
        send_control(run_dir, "pause")
        wait_for(lambda: json.loads((run_dir / "status.json").read_text())["state"] == "paused", 60, "pause")
        assert launcher.poll() is None and rank_process(launcher, 1).is_running()
        send_control(run_dir, "stop")
        output, _ = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, output[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["stopped_by"] == "stop request"
    assert (run_dir / "checkpoints" / "resume" / "state.json").exists()
    types = [e["type"] for e in read_events(run_dir)]
    assert "paused" in types and types.count("run_end") == 1


def test_a_killed_rank_ends_the_run_with_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    launcher = launch(tmp_path, recipe(tmp_path), run_dir, ZOPRO_DIST_TIMEOUT_S="30")
    try:
        wait_for(lambda: in_policy_stage(run_dir), 300, "the policy stage")
        rank_process(launcher, 1).kill()
        output, _ = launcher.communicate(timeout=120)  # not a hang
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    # rank 0 stops or pauses only through collectives (the agreed control requests, the checkpoint's
    # barrier), so torchrun's SIGTERM cannot end it quietly: the next collective names the lost rank
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed", (status, output[-3000:])
    error = status["error"]
    assert "rank 0 of 2 lost the other ranks" in error and "zopro run --resume" in error, error
    events = read_events(run_dir)
    assert [e["message"] for e in events if e["type"] == "error"] == [error]
    assert events[-1]["type"] == "run_end" and events[-1]["status"] == "failed"
    assert "lost the other ranks" in output  # said on the terminal too, not only in the run directory


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path):
    """Through `zopro run --nproc-per-node 2`, which starts torchrun itself."""
    done = zopro(
        "run",
        str(recipe(tmp_path)),
        "--run-dir",
        "odd",
        "--nproc-per-node",
        "2",
        "--set",
        "train.prompts_per_update=3",
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "train.prompts_per_update = 3 cannot be split evenly over 2 ranks" in done.stderr + done.stdout
    assert not (tmp_path / "odd" / "events.jsonl").exists()


class SignalledDuringTheGather(Distributed):
    """Rank `rank` of two, the other rank's (requests, signal) given: the collective is simulated, the signal
    and its handler are real. `signal_after_gather` sends SIGTERM to this process while it "waits" in the
    first gather, so Python runs the handler the moment the gather returns, as it does after a blocking gloo
    call."""

    def __init__(self, rank: int, other: list[tuple[list[str], str | None]], signal_after_gather: bool):
        super().__init__(rank=rank, world_size=2)
        self.other, self.signal_after_gather = list(other), signal_after_gather

    def gather(self, items, what="gathering results"):
        other = [self.other.pop(0) if self.other else ([], None)]
        every = list(items) + other if self.rank == 0 else other + list(items)
        if self.signal_after_gather:
            self.signal_after_gather = False
            os.kill(os.getpid(), signal.SIGTERM)
        return every

    def barrier(self) -> None:
        pass


def test_a_signal_handled_as_a_gather_returns_stops_every_rank_at_the_same_poll(tmp_path):
    """Both ranks stop at the poll after the one the signal came in: the rank that took the signal while
    agreeing does not stop alone (the other would wait for it in its next collective for ever)."""
    from engine.errors import StopRun
    from engine.recipe import load_recipe
    from engine.rundir.writer import RunWriter
    from engine.training.bookkeeping import RunBook

    path = recipe(tmp_path)
    stops = {}
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for rank, other in ((1, [([], None)]), (0, [([], None), ([], "SIGTERM")])):
            writer = RunWriter(tmp_path / f"rank{rank}").open()
            dist = SignalledDuringTheGather(rank, other, signal_after_gather=rank == 1)
            book = RunBook(load_recipe(path), writer, dist=dist)
            book._install_signal_handlers()
            for poll in range(3):
                try:
                    book.between_steps()
                except StopRun as stop:
                    stops[rank] = (poll, str(stop))
                    break
            writer.close()
    finally:
        for s, handler in kept.items():
            signal.signal(s, handler)
    assert stops == {0: (1, "SIGTERM"), 1: (1, "SIGTERM")}
