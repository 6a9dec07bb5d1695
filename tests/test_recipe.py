"""Recipes: defaults, overrides, and one clear sentence (exit 2, no run directory) for every malformed one."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli.app import app
from engine.recipe import Recipe, RecipeError, dump_recipe, load_recipe, recipe_from_dict
from tests.conftest import REPO, zopro

# (file name, TOML text, fragments the error sentence must contain)
MALFORMED = [
    ("unknown_top.toml", 'nmae = "x"\n', ["nmae", "did you mean 'name'"]),
    ("unknown_section.toml", "[polcy]\nmethod = 'rloo'\n", ["polcy", "did you mean 'policy'"]),
    ("unknown_key.toml", "[policy]\nmethd = 'rloo'\n", ["policy.methd", "did you mean 'method'"]),
    ("unknown_method.toml", "[policy]\nmethod = 'rlo'\n", ["policy.method", "rloo", "did you mean 'rloo'"]),
    ("method_type.toml", "[policy]\nmethod = 3\n", ["policy.method", "must be a string"]),
    ("bad_toml.toml", "[policy\nmethod = 'rloo'\n", ["not valid TOML"]),
    ("iterations_str.toml", "[train]\niterations = 'five'\n", ["train.iterations", "must be an integer"]),
    ("iterations_zero.toml", "[train]\niterations = 0\n", ["train.iterations", ">= 1"]),
    ("iterations_float.toml", "[train]\niterations = 2.5\n", ["train.iterations", "must be an integer"]),
    ("negative_lr.toml", "[rloo]\nlr = -0.1\n", ["rloo.lr", "> 0"]),
    ("zero_lr.toml", "[sft]\nlr = 0\n", ["sft.lr", "> 0"]),
    ("lr_string.toml", "[sft]\nlr = 'fast'\n", ["sft.lr", "must be a number"]),
    ("keep_fraction.toml", "[refine]\nkeep_fraction = 1.5\n", ["refine.keep_fraction", "<= 1"]),
    ("bool_type.toml", "[refine]\nkeep_close = 'yes'\n", ["refine.keep_close", "true or false"]),
    ("judge.toml", "[refine]\njudge = 'human'\n", ["refine.judge", "gold"]),
    ("device.toml", "device = 'tpu'\n", ["device", "auto, cpu, cuda"]),
    ("dtype.toml", "[model]\ndtype = 'fp8'\n", ["model.dtype", "bfloat16"]),
    ("section_scalar.toml", "model = 'builtin:tiny'\n", ["model", "must be a table"]),
    ("scalar_table.toml", "[model.base]\nname = 'x'\n", ["model.base", "not a table"]),
    (
        "target_modules.toml",
        "[model]\ntarget_modules = [1, 2]\n",
        ["model.target_modules", "must be a string"],
    ),
    ("samples_per_prompt.toml", "[train]\nsamples_per_prompt = 1\n", ["train.samples_per_prompt", ">= 2"]),
    ("seed_negative.toml", "seed = -1\n", ["seed", ">= 0"]),
    ("temperature.toml", "[policy]\ntemperature = 0\n", ["policy.temperature", "> 0"]),
    (
        "prompts_per_update.toml",
        "[task]\ntrain_prompts = 8\n[train]\nprompts_per_update = 16\n",
        ["train.prompts_per_update", "task.train_prompts"],
    ),
    ("clip.toml", "[policy]\nclip_range = 2.0\n", ["policy.clip_range", "<= 1"]),
    ("not_utf8.toml", "\udcff", ["not a text file"]),
]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    if "\udcff" in text:
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize(("name", "text", "fragments"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_recipe_is_one_sentence_exit_2_and_no_run_dir(tmp_path, name, text, fragments):
    recipe = write(tmp_path, name, text)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run", str(recipe), "--root", str(runs)])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith("error:") and str(recipe) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "Traceback" not in result.output
    assert not runs.exists()


def test_corpus_is_large_enough():
    assert len(MALFORMED) >= 20


def test_missing_recipe_file(tmp_path):
    result = CliRunner().invoke(app, ["run", str(tmp_path / "nope.toml"), "--root", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert "no such recipe file" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("policy.method=zopr", "policy.method"),
        ("train.iterations=abc", "train.iterations"),
        ("train.itrations=3", "did you mean 'iterations'"),
        ("novalue", "key.path=value"),
    ],
)
def test_bad_override_is_refused_like_the_file(tmp_path, override, fragment):
    runs = tmp_path / "runs"
    result = CliRunner().invoke(
        app, ["run", str(REPO / "recipes" / "tiny.toml"), "--root", str(runs), "--set", override]
    )
    assert result.exit_code == 2
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not runs.exists()


def test_defaults_fill_every_field_and_overrides_apply(tmp_path):
    recipe = load_recipe(
        REPO / "recipes" / "tiny.toml", ["train.iterations=5", "seed=3", "policy.kl_coef=0.2"]
    )
    assert recipe.train.iterations == 5 and recipe.seed == 3 and recipe.policy.kl_coef == 0.2
    assert recipe_from_dict({}) == Recipe()


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "tiny.toml", ["train.iterations=7"])
    path = tmp_path / "resolved.toml"
    path.write_text(dump_recipe(recipe))
    reloaded = load_recipe(path)
    assert dump_recipe(reloaded) == dump_recipe(recipe)  # the resolved text is a fixed point
    assert reloaded.train == recipe.train and reloaded.rloo == recipe.rloo and reloaded.model == recipe.model


def test_recipe_error_is_a_value_error():
    with pytest.raises(RecipeError):
        recipe_from_dict({"policy": {"method": "nope"}})


def test_validate_command_real_process(tmp_path):
    ok = zopro("validate", str(REPO / "recipes" / "tiny.toml"))
    assert ok.returncode == 0, ok.stderr
    bad = write(tmp_path, "bad.toml", "[policy]\nmethod = 'rlo'\n")
    result = zopro("validate", str(bad))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "did you mean 'rloo'" in result.stderr


def test_run_with_bad_recipe_real_process_leaves_nothing(tmp_path):
    bad = write(tmp_path, "bad.toml", "[train]\niterations = 'x'\n")
    result = zopro("run", str(bad), "--run-dir", str(tmp_path / "runs" / "mine"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_every_shipped_recipe_validates():
    recipes = sorted((REPO / "recipes").rglob("*.toml"))
    assert len(recipes) >= 5
    for path in recipes:
        result = CliRunner().invoke(app, ["validate", str(path)])
        assert result.exit_code == 0, (path, result.stderr)
