"""The model card (README.md) of an exported model: what it is, how it was trained, how it scored, how to
load it."""

from __future__ import annotations

from pathlib import Path

from engine.data.prompts import PLAIN_PROMPT_TEMPLATE
from engine.export.results import evaluation_rows, results_markdown
from engine.recipe import Recipe
from engine.rundir.reader import MAX_RECIPE_BYTES
from engine.rundir.safe_io import read_plain
from engine.rundir.wording import plural

KIND_TITLES = {
    "adapter": "LoRA adapter (peft)",
    "merged": "merged causal language model",
    "reward": "reward model (sequence classification)",
}


def usage(kind: str, base: str) -> str:
    if kind == "adapter":
        return (
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            'model = PeftModel.from_pretrained(base, "THIS_FOLDER")\n'
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")\n```'
        )
    if kind == "merged":
        return (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")\n'
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")\n```'
        )
    return (
        "```python\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
        'model = AutoModelForSequenceClassification.from_pretrained("THIS_FOLDER")\n'
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")\n'
        "# score = model(**tokenizer(prompt + response + tokenizer.eos_token, return_tensors='pt')).logits\n"
        "# zopro's score adds config.zopro_score_bias (a constant: it changes no comparison)\n```"
    )


def prompt_format(recipe: Recipe, chat: bool) -> str:
    """How the run's prompts looked to the model, so that a user prompts the exported one the same way."""
    if chat:
        return (
            "prompts: one user message through the tokenizer's chat template "
            "(`tokenizer.apply_chat_template([{'role': 'user', 'content': text}], add_generation_prompt=True)`)"
        )
    if recipe.task.name != "dataset":
        return f"prompts: the {recipe.task.name} task's texts as they are (no template), e.g. `describe the movie .`"
    if recipe.data.format == "preference_table":
        return f"prompts: `{PLAIN_PROMPT_TEMPLATE.encode('unicode_escape').decode()}` (no chat template)"
    if recipe.data.format == "hh_rlhf":
        return "prompts: the dialogue as `\\n\\nHuman: {text}\\n\\nAssistant:` (no chat template)"
    return (
        f"prompts: the {recipe.data.format} texts as they are, each ending in its own cue (no chat template)"
    )


def model_card(
    run_dir: Path,
    recipe: Recipe,
    *,
    kind: str,
    checkpoint: str,
    base: str,
    notes: list[str],
    chat: bool = False,
) -> str:
    """README.md for an exported folder: the recipe, method, data and the run's held-out results."""
    data = recipe.data.path or recipe.task.name
    try:
        recipe_text = read_plain(Path(run_dir) / "recipe.toml", MAX_RECIPE_BYTES).decode()
    except (OSError, UnicodeDecodeError):
        recipe_text = ""
    table = results_markdown(evaluation_rows(run_dir))
    lines = [
        "---",
        "library_name: " + ("peft" if kind == "adapter" else "transformers"),
        "tags: [zopro, " + recipe.policy.method + "]",
        "---",
        "",
        f"# {recipe.name}: {KIND_TITLES[kind]}",
        "",
        f"Trained with zopro from run `{Path(run_dir).name}`, checkpoint `{checkpoint}`.",
        "",
        f"- method: **{recipe.policy.method}** ({plural(recipe.train.iterations, 'iteration')} of "
        f"{plural(recipe.train.updates_per_iteration, 'policy update')}, the reward model refined after each)",
        f"- base: `{recipe.model.base}` ({recipe.model.dtype}), LoRA rank {recipe.model.lora_rank}, "
        f"alpha {recipe.model.lora_alpha:g} on {', '.join(recipe.model.target_modules)}",
        f"- data: `{data}`",
        f"- seed: {recipe.seed}",
        f"- {prompt_format(recipe, chat)}",
        *[f"- {note}" for note in notes],
        "",
        "## Held-out results",
        "",
        table or "The run logged no held-out evaluation.",
        "",
        "Scores are means over held-out prompts with their standard errors; gold is the task's own scorer "
        "(when it has one), fixed RM the reward model of the reward stage (comparable across rows), RM score "
        "the reward model as refined by then (not comparable across rows), KL the policy's from the SFT "
        "policy.",
        "",
        "## Use",
        "",
        usage(kind, base),
        "",
        "## Recipe",
        "",
        "```toml",
        recipe_text.strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
