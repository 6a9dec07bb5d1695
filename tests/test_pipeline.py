"""End to end on a real tiny model: the pipeline runs, resumes exactly, pauses, and never needs textual."""

from __future__ import annotations

import json
import sys

import pytest
from safetensors.torch import load_file

from engine.rundir.checkpoints import adapter_file
from engine.rundir.controls import send_control
from engine.rundir.reader import read_events, run_info
from tests.conftest import REPO, zopro, zopro_popen
from tests.runs import assert_resume_after_sigterm_is_exact, global_step, metric_events, wait_for


def test_run_writes_a_complete_run_directory(tmp_path, fast_recipe):
    run = tmp_path / "runs" / "mine"
    result = zopro("run", str(fast_recipe), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    for name in ("recipe.toml", "meta.json", "events.jsonl", "heartbeat", "status.json"):
        assert (run / name).exists(), name
    assert run_info(run).status == "finished"
    events = read_events(run)
    kinds = {e["type"] for e in events}
    assert {"run_start", "stage_start", "stage_end", "metrics", "eval", "checkpoint", "run_end"} <= kinds
    for event in events:
        assert {"seq", "type", "time", "stage", "iteration", "step"} <= set(event)
    evals = [e for e in events if e["type"] == "eval"]
    assert len(evals) == 1 + 2  # SFT baseline + one per iteration
    assert all("eval/gold" in e["metrics"] and "eval/win_rate_vs_sft" in e["metrics"] for e in evals)
    metrics = [e["metrics"] for e in events if e["type"] == "metrics"]
    assert all("compute/forward_passes" in m and "compute/tokens" in m for m in metrics)
    policy = [e["metrics"] for e in events if e["type"] == "metrics" and e["stage"] == "policy"]
    assert policy and all(
        k in policy[0] for k in ("objective/scores", "objective/kl", "objective/rlhf_reward")
    )
    agreement = [e["metrics"] for e in events if "judge/agreement_with_gold" in e.get("metrics", {})]
    assert [m["judge/agreement_with_gold"] for m in agreement] == [1.0, 1.0]  # the gold judge, per iteration
    stage_ends = [e for e in events if e["type"] == "stage_end"]
    assert all("wall_s" in e and "peak_rss_mib" in e for e in stage_ends)
    for name in ("sft", "reward", "iter-0000", "iter-0001"):
        assert (run / "checkpoints" / name / "adapters" / "policy" / "adapter_model.safetensors").exists()
    assert list((run / "samples").glob("samples-*.jsonl"))
    assert "held-out evaluation" in result.stdout


def test_checkpointed_adapters_load_with_plain_peft(tmp_path, fast_recipe):
    run = tmp_path / "run"
    assert zopro("run", str(fast_recipe), "--run-dir", str(run)).returncode == 0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((run / "meta.json").read_text())["base"]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), run / "checkpoints" / "iter-0001" / "adapters" / "policy"
    )
    saved = load_file(adapter_file(run / "checkpoints" / "iter-0001", "policy"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved)


def test_resume_after_sigterm_equals_an_uninterrupted_run(tmp_path, fast_recipe):
    straight = tmp_path / "straight"
    assert zopro("run", str(fast_recipe), "--run-dir", str(straight)).returncode == 0
    # interrupt in the middle of the first iteration's policy updates
    assert_resume_after_sigterm_is_exact(fast_recipe, straight, tmp_path / "interrupted", at_step=12 + 12 + 2)


def checkpoints_after_pause(run) -> int:
    types = [e["type"] for e in read_events(run)]
    return types[types.index("paused") :].count("checkpoint") if "paused" in types else 0


def test_pause_stops_steps_until_resume(tmp_path, fast_recipe):
    run = tmp_path / "run"
    process = zopro_popen("run", str(fast_recipe), "--run-dir", str(run))
    try:
        wait_for(lambda: global_step(run) >= 3)
        send_control(run, "pause")
        wait_for(lambda: run_info(run).status == "paused")
        paused_at = global_step(run)
        # the paused loop goes round: a checkpoint asked for now is written while paused, twice over
        for count in (1, 2):
            send_control(run, "checkpoint")
            wait_for(lambda count=count: checkpoints_after_pause(run) == count)
        assert not (run / "control" / "checkpoint").exists()  # taken
        assert global_step(run) == paused_at
        assert run_info(run).status == "paused"
        events = read_events(run)
        after = events[[e["type"] for e in events].index("paused") :]
        assert [e["type"] for e in after] == ["paused", "checkpoint", "checkpoint"]
        assert {e["global_step"] for e in after} == {after[0]["global_step"]}  # no step in between
        send_control(run, "resume")
        wait_for(lambda: global_step(run) > paused_at)
        assert run_info(run).status == "running"
        send_control(run, "stop")
        process.wait(timeout=120)
        assert process.returncode == 0
        assert run_info(run).status == "stopped"
    finally:
        if process.poll() is None:
            process.kill()


def test_existing_run_dir_is_refused(tmp_path, fast_recipe):
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text("{}")
    result = zopro("run", str(fast_recipe), "--run-dir", str(run))
    assert result.returncode == 2 and "--resume" in result.stderr


def test_missing_local_model_is_one_sentence(tmp_path, fast_recipe):
    result = zopro(
        "run", str(fast_recipe), "--run-dir", str(tmp_path / "run"), "--set", "model.base='./no/such/model'"
    )
    assert result.returncode == 2
    assert "model.base" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_zopro_run_never_imports_textual(tmp_path, fast_recipe):
    code = (
        "import sys\nsys.modules['textual'] = None  # any import of textual now fails\n"
        "from engine.cli.app import main\n"
        f"sys.argv = ['zopro', 'run', {str(fast_recipe)!r}, '--run-dir', {str(tmp_path / 'run')!r}]\n"
        "main()\n"
    )
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert run_info(tmp_path / "run").status == "finished"


@pytest.mark.slow
def test_tiny_pipeline_improves_the_gold_score(tmp_path):
    run = tmp_path / "run"
    # one thread (the recipe has two): the suite's two workers share two cores
    result = zopro(
        "run", str(REPO / "recipes" / "tiny.toml"), "--set", "threads=1", "--run-dir", str(run), timeout=900
    )
    assert result.returncode == 0, result.stderr
    evals = [e["metrics"] for e in read_events(run) if e["type"] == "eval"]
    assert evals[-1]["eval/gold"] > evals[0]["eval/gold"] + 0.1
    assert evals[-1]["eval/win_rate_vs_sft"] > 0.6


def test_kill_9_loses_only_work_since_the_last_checkpoint(tmp_path, fast_recipe):
    straight = tmp_path / "straight"
    assert zopro("run", str(fast_recipe), "--run-dir", str(straight)).returncode == 0
    killed = tmp_path / "killed"
    process = zopro_popen("run", str(fast_recipe), "--run-dir", str(killed))
    # past the reward-model checkpoint, inside the first iteration: no chance to checkpoint here
    wait_for(lambda: global_step(killed) >= 12 + 12 + 2 or process.poll() is not None, every=0.02)
    process.kill()
    process.wait(timeout=60)
    assert run_info(killed).status == "stale"
    assert not list((killed / "checkpoints").glob("iter-*"))
    resumed = zopro("run", "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    # the events written after the last checkpoint were rewound and re-emitted identically
    assert metric_events(killed) == metric_events(straight)
