"""A run's model back in memory from its run directory: the saved recipe, its task, the base it trained on
and a checkpoint's adapters, loaded with the engine's own loaders (no second loading path)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.data.preference_data import DataError
from engine.data.tasks import make_task
from engine.export.checkpoints import ExportError, require_run_dir
from engine.recipe import Recipe, RecipeError, load_recipe
from engine.rundir.reader import run_meta
from engine.rundir.safe_io import checked_inside
from engine.training.models import (
    BASE_NOTES,
    ModelError,
    PreferenceModel,
    apply_adapters,
    load_preference_model,
    quiet_transformers,
    read_adapters,
    resolve_base,
    resolve_device,
)


@dataclass
class RunModel:
    """A run's recipe, task and model (the three adapters and the score head) as one checkpoint left them."""

    run_dir: Path
    recipe: Recipe
    task: Any
    pm: PreferenceModel
    base: str  # the folder (or hub id) the base was loaded from
    checkpoint: str = ""

    def load_checkpoint(self, folder: Path) -> None:
        try:
            apply_adapters(self.pm, read_adapters(folder, self.pm.device))
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise ExportError(f"{folder} cannot be read: {first}") from None
        self.checkpoint = folder.name


def run_recipe(run_dir: Path) -> Recipe:
    run_dir = require_run_dir(run_dir)
    path = run_dir / "recipe.toml"
    try:
        checked_inside(run_dir, path)
    except FileNotFoundError:
        raise ExportError(f"{run_dir} has no recipe.toml; it was not written by `zopro run`") from None
    except OSError as error:
        raise ExportError(f"{path} {error.strerror}; it was not written by `zopro run`") from None
    try:
        return load_recipe(path, [])
    except RecipeError as error:
        raise ExportError(f"{path}: {error}") from None


def run_base(run_dir: Path, recipe: Recipe, task: Any) -> str:
    """The base the run trained on: meta.json's resolved folder when it is still there and is the recipe's own
    folder or one zopro built or dequantised (it holds zopro's note of how), else resolved again from the
    recipe (a built-in base is rebuilt, identically, from the task's text and the seed). A meta.json never
    makes zopro load a model from anywhere else."""
    m = recipe.model
    base = run_meta(run_dir).get("base")
    if isinstance(base, str) and base and (Path(base) / "config.json").is_file():
        made_by_zopro = any((Path(base) / note).is_file() for note in BASE_NOTES)
        if made_by_zopro or Path(base).resolve() == Path(m.base).expanduser().resolve():
            return base
    return resolve_base(m.base, task.corpus(), recipe.seed, m.cache_dir, task.pretraining_text())


def load_run_model(run_dir: Path, device: str | None = None) -> RunModel:
    """The run's model as its recipe builds it (adapters freshly initialised: apply a checkpoint next)."""
    quiet_transformers()
    run_dir = require_run_dir(run_dir)
    recipe = run_recipe(run_dir)
    try:
        task = make_task(recipe)
        base = run_base(run_dir, recipe, task)
        m = recipe.model
        pm = load_preference_model(
            base,
            dtype=m.dtype,
            device=resolve_device(device or recipe.device),
            lora_rank=m.lora_rank,
            lora_alpha=m.lora_alpha,
            target_modules=m.target_modules,
            seed=recipe.seed,
        )
        if hasattr(task, "bind"):  # a dataset: prompts formatted for this tokenizer, as the run had them
            task.bind(pm.tokenizer, m.max_prompt_tokens + m.max_new_tokens)
    except (ModelError, DataError) as error:
        raise ExportError(f"{run_dir}: {error}") from None
    pm.model.eval()
    return RunModel(run_dir=run_dir, recipe=recipe, task=task, pm=pm, base=base)
