"""`zopro generate`: answers from checkpoints side by side, reproducible, the run's own evaluation answers
with its seed; refusals in one sentence; and the TUI's answers screen (two evaluations side by side)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from engine.rundir.answers import evaluation_answers
from tests.conftest import FAST_RECIPE, zopro
from tests.runs import finished_run
from zopro_tui.app import ZoproApp
from zopro_tui.screens.answers import AnswersScreen
from zopro_tui.screens.dashboard import DashboardScreen


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    recipe = FAST_RECIPE + "\n[eval]\nsamples_per_prompt = 2\n"  # the evaluation draws two answers a prompt
    return finished_run(tmp_path_factory.mktemp("generate"), "fast", recipe)[1]


def generated(*args: str) -> dict:
    result = zopro("generate", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_with_the_runs_seed_the_answers_are_the_ones_its_evaluation_logged(run):
    out = generated(str(run), "--compare", "sft,iter-1")
    logged = evaluation_answers(run)
    assert out["checkpoints"] == ["sft", "iter-1"] and out["reward_checkpoint"] == "iter-0001"
    firsts = {label: rows[::2] for label, rows in logged.items()}  # each prompt's first of its two answers
    assert [p["prompt"] for p in out["prompts"]] == [row["prompt"] for row in firsts["it 2"]]
    for entry, sft_row, last_row in zip(out["prompts"], firsts["SFT"], firsts["it 2"], strict=True):
        assert entry["answers"]["sft"]["response"] == sft_row["response"]
        assert entry["answers"]["iter-1"]["response"] == last_row["response"]
        assert entry["answers"]["iter-1"]["reward"] == pytest.approx(last_row["score"], abs=1e-3)
        assert entry["answers"]["iter-1"]["gold"] is not None  # the built-in task has a gold scorer


def test_the_same_seed_gives_the_same_answers_and_another_seed_others(run):
    args = (
        str(run),
        "--compare",
        "sft,latest",
        "--prompt",
        "describe the movie .",
        "--prompt",
        "how was the city ?",
    )
    first = generated(*args, "--seed", "7")
    again = generated(*args, "--seed", "7")
    other = generated(*args, "--seed", "8")
    assert first == again
    answers = lambda out: [a["response"] for p in out["prompts"] for a in p["answers"].values()]  # noqa: E731
    assert answers(first) != answers(other)
    assert [p["prompt"] for p in first["prompts"]] == ["describe the movie .", "how was the city ?"]


def test_prompts_from_a_file_and_the_table(run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('review the song .\n\n{"prompt": "describe the soup ."}\n')
    out = generated(str(run), "--prompts", str(prompts), "--checkpoint", "iter-0")
    assert [p["prompt"] for p in out["prompts"]] == ["review the song .", "describe the soup ."]
    table = zopro("generate", str(run), "--prompts", str(prompts), "--compare", "sft,latest")
    assert table.returncode == 0 and "review the song ." in table.stdout and "mean latest" in table.stdout


def test_a_missing_checkpoint_or_bad_input_is_refused_in_one_sentence(run, tmp_path):
    for args, words in (
        (("--checkpoint", "iter-5"), "has no complete checkpoint 'iter-5'"),
        (("--compare", "sft,iter-3"), "has no complete checkpoint 'iter-3'"),
        (("--prompts", str(tmp_path / "none.txt")), "cannot be read"),
        (("--prompt", "x", "--prompts", str(tmp_path / "none.txt")), "not both"),
        (("--temperature", "0"), "must be above 0"),
    ):
        result = zopro("generate", str(run), *args)
        assert result.returncode == 2, (args, result.stderr)
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    result = zopro("generate", str(run), "--prompts", str(bad))
    assert result.returncode == 2 and "line 1" in result.stderr
    stray = zopro("generate", str(tmp_path))
    assert stray.returncode == 2 and "is not a run directory" in stray.stderr


async def test_the_samples_panel_opens_two_evaluations_answers_side_by_side(run):
    app = ZoproApp(run.parent, attach=run)
    async with app.run_test(size=(140, 40)) as pilot:
        deadline = time.monotonic() + 10
        while not isinstance(app.screen, DashboardScreen) and time.monotonic() < deadline:
            await pilot.pause(0.2)
        app.screen.query_one("#samples").focus()
        await pilot.press("a")
        await pilot.pause(0.2)
        screen = app.screen
        assert isinstance(screen, AnswersScreen) and screen.chosen == ["SFT", "it 2"]
        logged = evaluation_answers(run)
        table = screen.query_one("DataTable")
        assert table.row_count == len(logged["SFT"])
        first = [str(cell) for cell in table.get_row_at(0)]
        assert first[1] == logged["SFT"][0]["response"] and first[4] == logged["it 2"][0]["response"]
        await pilot.press("left_square_bracket")
        assert screen.chosen == ["it 1", "it 2"]
        assert str(table.get_row_at(0)[1]) == logged["it 1"][0]["response"]
        await pilot.press("escape")
        assert isinstance(app.screen, DashboardScreen)


def test_a_users_prompt_goes_through_the_chat_template_when_the_tokenizer_has_one(run):
    from engine.export.generation import task_prompt
    from engine.export.run_model import load_run_model

    model = load_run_model(run)
    assert (
        task_prompt(model, "describe the movie .") == "describe the movie ."
    )  # the built-in task's own form
    model.pm.tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert task_prompt(model, "describe the movie .") == "<|user|>describe the movie .<|assistant|>"


def test_a_built_in_base_that_is_gone_is_rebuilt_and_gives_the_same_answers(run, tmp_path):
    """meta.json's base folder removed and another cache: generate builds the base again (its pretraining
    needs gradients inside generate's no-grad sampling) and answers as before."""
    import shutil
    import tomllib

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["base"] = str(tmp_path / "gone")
    (copy / "meta.json").write_text(json.dumps(meta))
    recipe = (copy / "recipe.toml").read_text()
    assert tomllib.loads(recipe)["model"]["cache_dir"] == ""
    (copy / "recipe.toml").write_text(recipe.replace('cache_dir = ""', f'cache_dir = "{tmp_path / "cache"}"'))
    again = generated(str(copy), "--compare", "sft,latest")
    assert list((tmp_path / "cache" / "builtin").iterdir()), "built into the recipe's cache"
    assert again["prompts"] == generated(str(run), "--compare", "sft,latest")["prompts"]
