"""Hostile recipes and overrides: each is refused by `validate` (and `run`) in one sentence, exit 2, nothing
created; the resolved recipe is valid TOML whatever its strings hold; the README's own-data example loads."""

from __future__ import annotations

import json
import re
import tomllib

import pytest
from typer.testing import CliRunner

from engine.cli.app import app
from engine.data.tasks import make_task
from engine.recipe import Recipe, dump_recipe, load_recipe
from tests.conftest import REPO

TINY = str(REPO / "recipes" / "tiny.toml")

# (--set override, fragments the one-line error must contain)
HOSTILE_OVERRIDES = [
    ("name=../../x", ["name", "one folder name"]),
    ("name=/tmp/elsewhere/x", ["name", "one folder name"]),
    ("name=a/b", ["name", "one folder name"]),
    ('name=""', ["name", "one folder name"]),
    ('name="a\\nb"', ["name", "control character"]),
    ('name="a\\u0000b"', ["name", "control character"]),
    ("name=" + "n" * 300, ["name", "300 characters"]),
    ("name=.hidden", ["name", "one folder name"]),
    ("name=..", ["name", "one folder name"]),
    ("name=-rf", ["name", "one folder name"]),
    ("rloo.lr=nan", ["rloo.lr", "finite"]),
    ("rloo.lr=inf", ["rloo.lr", "finite"]),
    ("model.lora_alpha=inf", ["model.lora_alpha", "finite"]),
    ("refine.keep_fraction=nan", ["refine.keep_fraction", "finite"]),
    ("policy.kl_coef=-inf", ["policy.kl_coef", "finite"]),
    ("sft.lr=nan", ["sft.lr", "finite"]),
    ("eval.temperature=inf", ["eval.temperature", "finite"]),
    ("train.iterations=1e20", ["train.iterations", "<= 10000"]),
    ("threads=100000", ["threads", "<= 1024"]),
    ("seed=18446744073709551616", ["seed", "<= 9223372036854775807"]),
    ("model.lora_rank=4096", ["model.lora_rank", "<= 1024"]),
    ("sft.steps=99999999999", ["sft.steps", "<= 1000000000"]),
    ("task.train_prompts=10000000000", ["task.train_prompts", "<= 1000000000"]),
    ("model.max_new_tokens=100000000", ["model.max_new_tokens", "<= 131072"]),
    ("train.samples_per_prompt=100000", ["train.samples_per_prompt", "<= 1024"]),
    ("model.cache_dir=/etc/passwd", ["model.cache_dir", "is a file"]),
    ("model.cache_dir=/etc/passwd/below", ["model.cache_dir", "is a file"]),
    ("model.cache_dir=" + "c" * 5000, ["model.cache_dir", "cannot be a folder"]),
    ('model.base="builtin:tiny\\u0000"', ["model.base", "control character"]),
    ('model.target_modules=["q_proj\\n"]', ["model.target_modules[0]", "control character"]),
    ("train.iterations=" + "[" * 5000 + "]" * 5000, ["train.iterations", "nested too deeply"]),
]


@pytest.mark.parametrize(
    ("override", "fragments"), HOSTILE_OVERRIDES, ids=[o[:40] for o, _ in HOSTILE_OVERRIDES]
)
def test_hostile_override_is_refused_in_one_sentence(tmp_path, override, fragments):
    runs = tmp_path / "runs"
    for command in (["validate", TINY], ["run", TINY, "--root", str(runs)]):
        result = CliRunner().invoke(app, [*command, "--set", override])
        assert result.exit_code == 2, result.output
        message = result.stderr.strip()
        assert len(message.splitlines()) == 1, message
        assert message.startswith("error:") and "Traceback" not in result.output
        for fragment in fragments:
            assert fragment in message, (fragment, message)
    assert not runs.exists()


def test_recipe_nested_5000_deep_is_one_sentence(tmp_path):
    recipe = tmp_path / "deep.toml"
    recipe.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    for command in ("validate", "run"):
        extra = ["--root", str(tmp_path / "runs")] if command == "run" else []
        result = CliRunner().invoke(app, [command, str(recipe), *extra])
        assert result.exit_code == 2, result.output
        assert "nested too deeply" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["run-dir", "root"])
def test_run_dir_or_root_that_is_a_file_is_refused_before_loading(tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    option = ["--run-dir", str(blocker)] if where == "run-dir" else ["--root", str(blocker)]
    result = CliRunner().invoke(app, ["run", TINY, *option])
    assert result.exit_code == 2, result.output
    assert "is a file" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert blocker.read_text() == "not a folder\n"


def test_resolved_recipe_is_valid_toml_for_any_string():
    recipe = Recipe()
    recipe.model.cache_dir = 'a "quoted" \\ back\nslash\ttab\x7fdel \x00 nul é ☃'
    recipe.model.target_modules = ["line\nbreak", "\x1b[31m"]
    parsed = tomllib.loads(dump_recipe(recipe))
    assert parsed["model"]["cache_dir"] == recipe.model.cache_dir
    assert parsed["model"]["target_modules"] == recipe.model.target_modules


def readme_own_data_recipe() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Your own data", 1)[1]
    return re.search(r"```toml\n(.*?)```", section, re.S).group(1)


def test_readme_own_data_example_without_a_score_column_loads(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    rows = [
        json.loads(line) for line in (REPO / "tests/fixtures/datasets/preference_table/pairs.jsonl").open()
    ]
    with open(tmp_path / "data" / "pairs.jsonl", "w") as out:
        for row in rows:
            out.write(json.dumps({k: v for k, v in row.items() if k in ("question", "good", "bad")}) + "\n")
    (tmp_path / "own.toml").write_text(readme_own_data_recipe())
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("own.toml")
    task = make_task(recipe)
    assert task.preference_pairs(4) and all(pair.score is None for pair in task.preference_pairs(4))
    # a score column that the recipe names explicitly must still exist
    explicit = load_recipe("own.toml", ["data.score_column=rating"])
    with pytest.raises(ValueError, match="rating"):
        make_task(explicit)
