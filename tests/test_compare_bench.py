"""`zopro compare` and `zopro bench methods` through the real command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from engine.cli.compare import COMPARISON_JSON, comparison_row, comparison_table
from engine.rundir.writer import RunWriter
from tests.conftest import FAST_RECIPE, zopro


def test_compare_runs_methods_into_sibling_dirs_with_one_seed(tmp_path):
    recipe = tmp_path / "fast.toml"
    recipe.write_text(
        FAST_RECIPE
        + '\n[mezo]\nlr = 1e-3\neps = 1e-3\ng_clip = 0.5\n\n[compare]\nmethods = ["rloo", "mezo"]\n'
    )
    result = zopro("compare", str(recipe), "--root", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    (folder,) = (tmp_path / "runs").iterdir()
    rows = {p.name: comparison_row(p) for p in folder.iterdir() if p.is_dir()}
    assert set(rows) == {"rloo", "mezo"}
    assert rows["rloo"]["method"] == "rloo" and rows["mezo"]["method"] == "mezo"
    # same seed and data: the SFT baseline (before any method-specific step) is identical
    assert rows["rloo"]["sft_gold"] == rows["mezo"]["sft_gold"]
    for row in rows.values():
        assert row["final_gold"] is not None and row["policy_forward_passes"] > 0
        assert row["peak_update_mem_mib"] is not None
    assert "comparison" in result.stdout and "win vs SFT" in result.stdout
    written = {row["method"]: row for row in json.loads((folder / COMPARISON_JSON).read_text())}
    assert written["rloo"] == json.loads(json.dumps(rows["rloo"]))
    assert written["mezo"]["final_gold_se"] > 0, "the evaluation's standard error rides along as a field"
    assert "±" in result.stdout


def evaluated_run(run: Path, evaluations: list[dict]) -> Path:
    with RunWriter(run) as writer:
        writer.update_status(state="finished", method="zopro", stage="done", started=time.time() - 60)
        for index, metrics in enumerate(evaluations):
            writer.emit(
                "eval", stage="eval", step=0, iteration=index, global_step=10 * index, metrics=metrics
            )
    return run


def table_text(rows: list[dict]) -> str:
    console = Console(width=200, record=True)
    console.print(comparison_table(rows))
    return console.export_text()


def test_final_scores_carry_their_standard_errors_where_the_run_logged_them(tmp_path):
    sft = {
        "eval/gold": 0.3,
        "eval/gold_se": 0.02,
        "eval/win_rate_vs_sft": 0.5,
        "eval/win_rate_vs_sft_se": 0.0,
    }
    final = {
        "eval/gold": 0.468,
        "eval/gold_se": 0.012,
        "eval/win_rate_vs_sft": 0.61,
        "eval/win_rate_vs_sft_se": 0.031,
    }
    row = comparison_row(evaluated_run(tmp_path / "new", [sft, final]))
    assert (row["final_gold"], row["final_gold_se"]) == (0.468, 0.012)
    assert (row["win_rate_vs_sft"], row["win_rate_vs_sft_se"]) == (0.61, 0.031)
    assert "0.468 ± 0.012" in table_text([row]) and "0.610 ± 0.031" in table_text([row])

    old = {"eval/gold": 0.468, "eval/win_rate_vs_sft": 0.61}  # a run from before the standard errors
    row = comparison_row(evaluated_run(tmp_path / "old", [old]))
    assert row["final_gold_se"] is None and row["win_rate_vs_sft_se"] is None
    text = table_text([row])
    assert "0.468" in text and "±" not in text


def test_compare_with_a_bad_method_creates_nothing(tmp_path):
    recipe = tmp_path / "fast.toml"
    recipe.write_text(FAST_RECIPE)
    result = zopro("compare", str(recipe), "--methods", "rloo,sgd", "--root", str(tmp_path / "runs"))
    assert result.returncode == 2 and "policy.method" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_bench_methods_writes_the_json_shape(tmp_path):
    out = tmp_path / "bench.json"
    result = zopro(
        "bench",
        "methods",
        "--model",
        "builtin:nano",
        "--methods",
        "rloo,zopro",
        "--prompts",
        "2",
        "--samples",
        "2",
        "--new-tokens",
        "8",
        "--updates",
        "2",
        "--threads",
        "1",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert json.loads(result.stdout) == report
    assert set(report["methods"]) == {"rloo", "zopro"}
    for row in report["methods"].values():
        assert row["peak_update_mem_mib"] >= 0 and row["time_per_update_s"] > 0
        assert row["peak_rollout_mem_mib"] >= 0
        assert row["step_s"] >= row["time_per_update_s"]
        assert row["sample_tokens_per_s"] > 0 and row["generate_tokens_per_s"] > 0
    assert report["methods"]["rloo"]["forward_passes_per_update"] == 1
    assert report["methods"]["zopro"]["forward_passes_per_update"] == 2  # q = 1: two forward passes
    rloo, zo = report["methods"]["rloo"], report["methods"]["zopro"]
    assert rloo["forward_tokens_per_update"] == rloo["tokens_per_update"] > 0  # one pass over the batch
    assert zo["forward_tokens_per_update"] == 2 * zo["tokens_per_update"]
    assert report["config"]["model"] == "builtin:nano"
    assert report["config"]["gradient_checkpointing"] == "auto"


def test_the_zeroth_order_update_needs_a_fraction_of_rloos_memory(tmp_path):
    """The point of zeroth-order methods, measured by `zopro bench methods` (each method in a fresh process,
    peak RSS growth over the update) on the built-in tiny Llama, 16 prompts x 4 answers x 48 tokens: RLOO keeps
    the activations for its backward, MeZO and ZOPrO run forward passes without autograd (measured here:
    rloo 243 MiB, mezo 40, zopro 52)."""
    out = tmp_path / "bench.json"
    result = zopro(
        *("bench", "methods", "--model", "builtin:tiny", "--methods", "rloo,mezo,zopro"),
        *("--prompts", "16", "--samples", "4", "--new-tokens", "48", "--updates", "2", "--threads", "1"),
        *("--json", str(out)),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["methods"]
    rloo = rows["rloo"]["peak_update_mem_mib"]
    assert rloo > 100, rows  # the activations of a backward over 64 x 48 tokens, well above the noise
    for method in ("mezo", "zopro"):
        assert rows[method]["peak_update_mem_mib"] <= 0.3 * rloo, (method, rows[method], rloo)


def test_bench_methods_with_an_unknown_checkpointing_mode_is_one_sentence():
    result = zopro("bench", "methods", "--checkpointing", "sometimes")
    assert result.returncode != 0
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("--checkpointing 'sometimes': accepted: auto, on, off")
    )
    assert not result.stdout.strip()
