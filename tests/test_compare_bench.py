"""`zopro compare` and `zopro bench methods` through the real command line."""

from __future__ import annotations

import json

from engine.compare import comparison_row
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
    rows = {p.name: comparison_row(p) for p in folder.iterdir()}
    assert set(rows) == {"rloo", "mezo"}
    assert rows["rloo"]["method"] == "rloo" and rows["mezo"]["method"] == "mezo"
    # same seed and data: the SFT baseline (before any method-specific step) is identical
    assert rows["rloo"]["sft_gold"] == rows["mezo"]["sft_gold"]
    for row in rows.values():
        assert row["final_gold"] is not None and row["policy_forward_passes"] > 0
        assert row["peak_update_mem_mib"] is not None
    assert "comparison" in result.stdout and "win vs SFT" in result.stdout


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
    assert report["methods"]["rloo"]["forward_passes_per_update"] == 1
    assert report["methods"]["zopro"]["forward_passes_per_update"] == 2  # q = 1: two forward passes
    assert report["config"]["model"] == "builtin:nano"
