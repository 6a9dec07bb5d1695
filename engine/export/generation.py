"""`zopro generate`: answers from one or several checkpoints of a run on the same prompts and the same noise,
sampled with the engine's own sampler, scored by the run's reward model and, where the task has one, its
gold scorer. With the run's seed and its held-out prompts the answers are the ones its evaluation logged."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.data.prompts import format_prompt, has_chat_template
from engine.export.checkpoints import ExportError, checkpoint_folder, policy_adapter_of
from engine.export.run_model import RunModel, load_run_model
from engine.seeds import generator
from engine.training.rollout import Sequences, reward_scores, sample
from engine.training.telemetry import Counters

DEFAULT_PROMPTS = 8


@dataclass
class Generation:
    """The answers of each checkpoint (in the order asked) to the same prompts."""

    run: str
    prompts: list[str]
    checkpoints: list[str]
    answers: dict[str, list[dict]]  # checkpoint: one {response, finished, reward, gold} per prompt
    reward_checkpoint: str
    seed: int
    temperature: float

    def to_json(self) -> dict:
        return {
            "run": self.run,
            "seed": self.seed,
            "temperature": self.temperature,
            "reward_checkpoint": self.reward_checkpoint,
            "checkpoints": self.checkpoints,
            "prompts": [
                {"prompt": prompt, "answers": {name: self.answers[name][i] for name in self.checkpoints}}
                for i, prompt in enumerate(self.prompts)
            ],
        }


HH_PROMPT = "\n\nHuman: {text}\n\nAssistant:"  # an hh-rlhf prompt without a chat template


def task_prompt(run_model: RunModel, text: str) -> str:
    """A user's text as the run's own prompts look: one user message through the chat template when the
    tokenizer has one; else as the run's data formats its prompts (the plain user/assistant template for a
    preference table, a Human/Assistant turn for hh-rlhf) and as it is for the built-in task and the
    datasets whose prompts end in their own cue (TL;DR:, German:), where the user writes that cue."""
    tokenizer = run_model.pm.tokenizer
    if has_chat_template(tokenizer):
        return format_prompt(tokenizer, text)
    data_format = run_model.recipe.data.format if hasattr(run_model.task, "bind") else ""
    if data_format == "preference_table":
        return format_prompt(tokenizer, text)
    if data_format == "hh_rlhf":
        return HH_PROMPT.format(text=text.strip())
    return text


def read_prompts(path: Path) -> list[str]:
    """One prompt a line (blank lines skipped), or a JSONL file of {"prompt": ...} objects."""
    import json

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ExportError(
            f"--prompts {path} cannot be read ({getattr(error, 'strerror', None) or error})"
        ) from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                value = json.loads(line)["prompt"]
                assert isinstance(value, str)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise ExportError(
                    f'{path} line {number} is not a JSON object with a "prompt" string'
                ) from None
            prompts.append(value)
        else:
            prompts.append(line)
    if not prompts:
        raise ExportError(f"{path} holds no prompts; write one a line")
    return prompts


@torch.no_grad()
def generate(
    run_dir: Path,
    checkpoints: list[str],
    texts: list[str] | None = None,
    *,
    seed: int | None = None,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    device: str | None = None,
) -> Generation:
    """Sample one answer per prompt from each checkpoint's policy on the same generator; `texts` None: the
    run's first held-out prompts, each with the first of the answers its evaluation drew for it (the same
    batch, rows and noise). Scores are the newest checkpoint's reward model's (one judge for all)."""
    folders = [checkpoint_folder(run_dir, name) for name in checkpoints]  # refuse before loading a model
    judge = checkpoint_folder(run_dir, "latest")
    run_model = load_run_model(run_dir, device)
    recipe, pm = run_model.recipe, run_model.pm
    rows = None
    if texts is None:  # the evaluation's own batch (n answers a prompt), of which each prompt's first answer
        per_prompt = recipe.eval.samples_per_prompt
        held_out = run_model.task.prompts(recipe.task.eval_prompts, "eval")
        batch = [prompt for prompt in held_out for _ in range(per_prompt)]
        rows = slice(0, min(DEFAULT_PROMPTS, len(held_out)) * per_prompt, per_prompt)
        prompts = batch[rows]
    else:
        batch = prompts = [task_prompt(run_model, text) for text in texts]
    seed = recipe.seed if seed is None else seed
    temperature = recipe.eval.temperature if temperature is None else temperature
    counters = Counters()
    sampled: list[Sequences] = []
    for folder in folders:
        run_model.load_checkpoint(folder)
        with pm.adapter(policy_adapter_of(folder)):
            sampled.append(
                sample(
                    pm,
                    batch,
                    rows=rows,  # on the noise the whole evaluation batch draws: its logged answers
                    max_new_tokens=max_new_tokens or recipe.model.max_new_tokens,
                    max_prompt_tokens=recipe.model.max_prompt_tokens,
                    temperature=temperature,
                    generator=generator(
                        seed, "eval"
                    ),  # the evaluation's noise: the same for every checkpoint
                    counters=counters,
                )
            )
    run_model.load_checkpoint(judge)
    task = run_model.task
    answers: dict[str, list[dict]] = {}
    for name, seqs in zip(checkpoints, sampled, strict=True):
        scores = reward_scores(pm, seqs.input_ids, seqs.attention_mask, counters).tolist()
        entries = []
        for i, (prompt, response) in enumerate(zip(prompts, seqs.responses, strict=True)):
            finished = bool(seqs.finished[i])
            gold = task.gold(prompt, response, finished) if task.has_gold else None
            entries.append({"response": response, "finished": finished, "reward": scores[i], "gold": gold})
        answers[name] = entries
    return Generation(
        run=Path(run_dir).name,
        prompts=prompts,
        checkpoints=list(checkpoints),
        answers=answers,
        reward_checkpoint=judge.name,
        seed=seed,
        temperature=temperature,
    )
