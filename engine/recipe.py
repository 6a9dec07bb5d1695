"""Recipes: the typed schema with a default for every field, TOML loading, `--set` overrides, validation.

Every user error becomes a `RecipeError` whose message is one sentence naming the file, the key path
and what is accepted. Nothing is created before a recipe validates.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

FIRST_ORDER_METHODS = ("rloo", "ppo", "online_dpo")
REPORT_TO = ("tensorboard", "wandb")  # [log] report_to: engine/mirror.py
ZEROTH_ORDER_METHODS = ("mezo", "zopro")
METHODS = FIRST_ORDER_METHODS + ZEROTH_ORDER_METHODS
INT_CEILING = 10**9  # no count, size or step of a run comes near this; larger is a typo
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}")


class RecipeError(ValueError):
    """A recipe the engine cannot run; the message is one sentence for the user."""


def spec(
    default: Any = dataclasses.MISSING,
    *,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    help: str = "",
    factory: Any = None,
) -> Any:
    """A schema field: its default, the accepted values and a line of help."""
    meta = {"choices": choices, "low": low, "high": high, "low_open": low_open, "help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --- the schema ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    base: str = spec("builtin:tiny", help="builtin:nano|tiny|small|base10m, a hub id, or a local folder")
    dtype: str = spec("float32", choices=("float32", "bfloat16", "float16"), help="dtype of the frozen base")
    lora_rank: int = spec(8, low=1, high=1024)
    lora_alpha: float = spec(16.0, low=0.0, low_open=True)
    target_modules: list[str] = spec(
        factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "lm_head",
        ],
        help='module names for LoRA, or ["all-linear"]',
    )
    max_prompt_tokens: int = spec(32, low=1, high=131072)
    max_new_tokens: int = spec(16, low=1, high=131072, help="response length in tokens (the paper: 53)")
    cache_dir: str = spec("", help="where built-in models are built; default ~/.cache/zopro or $ZOPRO_CACHE")


@dataclass
class TaskConfig:
    name: str = spec("builtin:sentiment", help="builtin:sentiment, or dataset (read from [data])")
    train_prompts: int = spec(512, low=1)
    eval_prompts: int = spec(64, low=1)
    sft_examples: int = spec(2048, low=8)
    preference_pairs: int = spec(2048, low=8)


@dataclass
class DataConfig:
    """A preference dataset, used when task.name = "dataset" (formats of engine/preference_data.py)."""

    format: str = spec(
        "preference_table", choices=("hh_rlhf", "summarize_from_feedback", "wmt20_mlqe", "preference_table")
    )
    path: str = spec("", help="a hub id (Anthropic/hh-rlhf) or a local file or folder")
    split: str = spec("train")
    config: str = spec("", help="hub config: comparisons, en-de, ...")
    data_dir: str = spec("", help="hub sub-folder, e.g. harmless-base")
    limit: int = spec(0, low=0, help="rows to keep (0: all)")
    prompt_column: str = spec("prompt")
    chosen_column: str = spec("chosen")
    rejected_column: str = spec("rejected")
    score_column: str = spec("score")
    wmt_rejected: str = spec("source_copy", choices=("source_copy", "none"))

    def source(self):
        from engine.preference_data import PreferenceSource

        columns = {
            "prompt": self.prompt_column,
            "chosen": self.chosen_column,
            "rejected": self.rejected_column,
        }
        if self.score_column != "score":  # a renamed score column must exist; the default one is optional
            columns["score"] = self.score_column
        return PreferenceSource(
            format=self.format,
            path=self.path,
            split=self.split,
            config=self.config or None,
            data_dir=self.data_dir or None,
            limit=self.limit or None,
            columns=columns,
            wmt_rejected=self.wmt_rejected,
        )


@dataclass
class SFTConfig:
    steps: int = spec(200, low=0)
    batch_size: int = spec(32, low=1)
    lr: float = spec(3e-3, low=0.0, low_open=True)


@dataclass
class RewardConfig:
    steps: int = spec(200, low=0)
    batch_size: int = spec(32, low=1)
    lr: float = spec(2e-3, low=0.0, low_open=True)
    score_mse_weight: float = spec(
        0.0, low=0.0, help="weight of an MSE term on a quality score, when data has one"
    )


@dataclass
class PolicyConfig:
    method: str = spec("rloo", choices=METHODS)
    temperature: float = spec(1.0, low=0.0, low_open=True)
    kl_coef: float = spec(0.05, low=0.0, help="beta of rlhf_reward = score - beta * KL")
    clip_range: float = spec(0.2, low=0.0, low_open=True, high=1.0)
    missing_eos_penalty: float = spec(
        0.0, low=0.0, help="subtracted from the score of answers that never end (as TRL)"
    )
    kl_target: float = spec(
        1.5,
        low=0.0,
        help="adaptive KL (Ziegler et al. 2019): after each update beta *= 1 + clip(KL/target - 1, "
        "+-0.2) / kl_horizon, KL = the rollout's mean sequence KL in nats, never below kl_coef (0: fixed beta)",
    )
    kl_horizon: float = spec(
        1.0,
        low=0.0,
        low_open=True,
        help="beta moves by at most 20 % / kl_horizon per update (Ziegler: 10; a run here has 60 updates)",
    )
    reward_clip: float = spec(
        0.0,
        low=0.0,
        help="clip reward-model scores to [-reward_clip, reward_clip] before the KL term (0: off)",
    )
    whiten_advantages: bool = spec(
        False, help="rescale the RLOO advantages to mean 0, std 1 over each rollout (rloo, mezo, zopro)"
    )
    max_kl: float = spec(
        0.0, low=0.0, help="held-out KL (nats per answer) above which max_kl_action is taken (0: off)"
    )
    max_kl_action: str = spec(
        "stop",
        choices=("stop", "rollback"),
        help="stop: stop after that iteration's checkpoint; rollback: restore the last iteration's "
        "checkpoint and finish the run with that policy",
    )


@dataclass
class TrainConfig:
    iterations: int = spec(4, low=1, high=10_000)
    updates_per_iteration: int = spec(15, low=1)
    prompts_per_update: int = spec(8, low=1)
    samples_per_prompt: int = spec(4, low=2, high=1024, help="k: answers sampled per prompt")


@dataclass
class RLOOConfig:
    lr: float = spec(5e-4, low=0.0, low_open=True)
    weight_decay: float = spec(0.0, low=0.0)
    max_grad_norm: float = spec(1.0, low=0.0, low_open=True)


@dataclass
class PPOConfig:
    lr: float = spec(5e-4, low=0.0, low_open=True)
    epochs: int = spec(1, low=1, help="passes over each rollout (the paper: 1)")
    minibatches: int = spec(1, low=1)
    gamma: float = spec(1.0, low=0.0, high=1.0)
    lam: float = spec(0.95, low=0.0, high=1.0, help="GAE lambda")
    vf_coef: float = spec(0.5, low=0.0)
    cliprange_value: float = spec(0.2, low=0.0, low_open=True)
    max_grad_norm: float = spec(1.0, low=0.0, low_open=True)
    whiten_advantages: bool = spec(True)


@dataclass
class OnlineDPOConfig:
    lr: float = spec(5e-4, low=0.0, low_open=True)
    beta: float = spec(0.1, low=0.0, low_open=True, help="DPO temperature")
    max_grad_norm: float = spec(1.0, low=0.0, low_open=True)


@dataclass
class ZerothOrderConfig:
    """Settings shared by mezo and zopro (paper-code defaults, method.md section 3)."""

    lr: float = spec(1e-4, low=0.0, low_open=True)
    lr_schedule: str = spec("linear", choices=("linear", "constant"), help="inside each iteration")
    eps: float = spec(1e-4, low=0.0, low_open=True, help="perturbation size (float32)")
    directions: int = spec(1, low=1, help="q: directions averaged per update")
    weight_decay: float = spec(0.0, low=0.0)
    g_clip: float = spec(0.0, low=0.0, help="clip each projected gradient g to [-g_clip, g_clip] (0: off)")
    max_consecutive_skips: int = spec(5, low=1, help="non-finite estimates in a row that stop the run")
    grad_cosine_every: int = spec(0, low=0, help="every K updates, cosine with the true gradient (0: off)")
    normalize_g: bool = spec(
        False, help="divide each g by its running RMS, so lr is the fraction of |z| moved per update"
    )
    g_rms_decay: float = spec(0.9, low=0.0, high=0.999, help="decay of the running mean of g^2")


@dataclass
class MeZOConfig(ZerothOrderConfig):
    sampler: str = spec(
        "isotropic", choices=("isotropic", "block"), help="isotropic N(0, I) (MeZO) or one block (MeZO-BCD)"
    )


@dataclass
class ZOPrOConfig(ZerothOrderConfig):
    decay_schedule: str = spec("exp", choices=("exp", "linear"), help="d: 0.999 e^-s, or 0.999 - s/S")
    decay_start: float = spec(0.999, low=0.0, high=0.999999)
    first_iteration: str = spec("rloo", choices=("rloo", "mezo"), help="iteration 0 has no mu or v yet")
    sampler: str = spec(
        "zopro",
        choices=("zopro", "subspace", "block", "isotropic"),
        help="zopro: the paper's informed directions; subspace: inside the span of the first-order "
        "iteration's gradients; block: MeZO-BCD; isotropic: MeZO",
    )
    z_norm: str = spec(
        "published",
        choices=("published", "reference"),
        help="length of z: as each sampler is published (the zopro sampler: |mu| of the last change), or "
        "'reference': the fixed |mu| of the first informed iteration, for every sampler",
    )
    subspace_snapshots: int = spec(
        16, low=1, high=1024, help="gradients kept for the subspace basis (memory: this x adapter size x 4 B)"
    )
    subspace_refresh_every: int = spec(
        0, low=0, help="every M iterations a first-order iteration renews the subspace basis (0: never)"
    )
    premise_check: bool = spec(True, help="score and gold along -mu, 0, +mu at each zeroth-order iteration")
    premise_step: float = spec(0.5, low=0.0, low_open=True, help="the premise check moves this many mu")
    premise_prompts: int = spec(32, low=1, help="held-out prompts of the premise check")
    premise_gradient_batches: int = spec(
        0, low=0, help="rollouts whose mean gradient is compared with mu (a backward each; 0: off)"
    )


@dataclass
class RefineConfig:
    judge: str = spec("gold", choices=("gold", "reward", "llm"))
    judge_model: str = spec("", help="the llm judge: a local folder or hub id of an instruction model")
    judge_dtype: str = spec("bfloat16", choices=("float32", "bfloat16", "float16"))
    keep_fraction: float = spec(0.6, low=0.0, low_open=True, high=1.0)
    epochs: int = spec(2, low=0)
    batch_size: int = spec(16, low=1)
    lr: float = spec(1e-3, low=0.0, low_open=True)
    keep_close: bool = spec(True, help="reward <- alpha * previous + (1 - alpha) * refined")
    keep_close_alpha: float = spec(0.5, low=0.0, high=1.0)


@dataclass
class InterplayConfig:
    enabled: bool = spec(True, help="policy-reward interplay metrics during training (method.md section 4)")
    sketch_size: int = spec(
        256, low=2, help="coordinates of the fixed random sketch for distance correlation"
    )
    every_step: bool = spec(True, help="also per policy update (norm, cosine with the previous update)")


@dataclass
class EvalConfig:
    temperature: float = spec(1.0, low=0.0, low_open=True)
    samples_per_prompt: int = spec(
        1, low=1, high=256, help="answers per held-out prompt; the standard errors are over prompts"
    )


@dataclass
class LogConfig:
    samples_every: int = spec(5, low=1, help="write samples/ every N policy updates")
    checkpoint_every: int = spec(
        0, low=0, help="also checkpoint every N policy updates (0: iteration ends only)"
    )
    report_to: list[str] = spec(
        factory=list, help="also mirror the metrics to: tensorboard, wandb (offline); see engine/mirror.py"
    )


@dataclass
class WatchdogConfig:
    """Runaway detection after each held-out evaluation (engine/watchdog.py): `warning` events, not stops."""

    kl_jump_factor: float = spec(
        4.0, low=0.0, help="warn when held-out KL grows by more than this factor in one iteration (0: off)"
    )
    kl_jump_min: float = spec(3.0, low=0.0, help="... and reaches at least this many nats per answer")
    gold_drop: float = spec(
        0.08,
        low=0.0,
        help="warn when held-out gold (win rate vs SFT without gold) falls by more than this in one "
        "iteration (0: off)",
    )


@dataclass
class Recipe:
    name: str = spec("run", help="prefix of the run directory's name")
    seed: int = spec(0, low=0, high=2**63 - 1)
    device: str = spec("auto", choices=("auto", "cpu", "cuda"))
    threads: int = spec(0, low=0, high=1024, help="torch CPU threads (0: leave torch's default)")
    model: ModelConfig = spec(factory=ModelConfig)
    task: TaskConfig = spec(factory=TaskConfig)
    data: DataConfig = spec(factory=DataConfig)
    sft: SFTConfig = spec(factory=SFTConfig)
    reward: RewardConfig = spec(factory=RewardConfig)
    policy: PolicyConfig = spec(factory=PolicyConfig)
    train: TrainConfig = spec(factory=TrainConfig)
    rloo: RLOOConfig = spec(factory=RLOOConfig)
    ppo: PPOConfig = spec(factory=PPOConfig)
    online_dpo: OnlineDPOConfig = spec(factory=OnlineDPOConfig)
    mezo: MeZOConfig = spec(factory=MeZOConfig)
    zopro: ZOPrOConfig = spec(factory=ZOPrOConfig)
    refine: RefineConfig = spec(factory=RefineConfig)
    interplay: InterplayConfig = spec(factory=InterplayConfig)
    eval: EvalConfig = spec(factory=EvalConfig)
    log: LogConfig = spec(factory=LogConfig)
    watchdog: WatchdogConfig = spec(factory=WatchdogConfig)

    @property
    def total_updates(self) -> int:
        return self.train.iterations * self.train.updates_per_iteration

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


METHOD_SECTIONS = {"rloo": "rloo", "ppo": "ppo", "online_dpo": "online_dpo", "mezo": "mezo", "zopro": "zopro"}
TASK_NAMES = ("builtin:sentiment", "dataset")  # method -> its recipe section (issue 3 adds the others)


# --- loading and validation ---------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0])}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin is list:
        (item,) = get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise RecipeError(f"{where} must be {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise RecipeError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise RecipeError(f"{where} = {value!r} is not accepted; it must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string, got {value!r}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RecipeError(f"{where} = {_shown(value)} is not valid UTF-8 text") from None
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise RecipeError(
                f"{where} = {_shown(value)} contains a control character (NUL, newline, tab, ...); write it on one line"
            )
        return value
    raise RecipeError(f"{where}: unsupported type")


def _shown(value: Any, limit: int = 60) -> str:
    """repr of a value, cut short so that one bad value keeps the error to one readable line."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(value)} characters)" if isinstance(value, str) else text[:limit] + "..."


def _bound(limit: float) -> str:
    return str(limit) if isinstance(limit, int) else f"{limit:g}"


def _check_bounds(value: Any, meta: dict, where: str) -> None:
    choices = meta.get("choices")
    if choices and value not in choices:
        hint = _suggest(str(value), list(choices))
        raise RecipeError(f"{where} = {value!r} is not accepted; choose one of {', '.join(choices)}{hint}")
    low, high = meta.get("low"), meta.get("high")
    if isinstance(value, int) and not isinstance(value, bool) and high is None:
        high = INT_CEILING
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if low is not None and (value < low or (meta.get("low_open") and value == low)):
            op = ">" if meta.get("low_open") else ">="
            raise RecipeError(f"{where} = {value!r} is out of range; it must be {op} {_bound(low)}")
        if high is not None and value > high:
            raise RecipeError(f"{where} = {value!r} is out of range; it must be <= {_bound(high)}")


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{source}: {prefix}{key}"
        if key not in fields:
            kind = "section" if isinstance(value, dict) else "key"
            options = list(fields)
            scope = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
            raise RecipeError(
                f"{where} is not a known {kind}{_suggest(key, options)}; keys accepted in {scope}: "
                f"{', '.join(options)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise RecipeError(f"{where} must be a table [{prefix}{key}], got {value!r}")
            kwargs[key] = _build(tp, value, f"{prefix}{key}.", source)
            continue
        if isinstance(value, dict):
            raise RecipeError(f"{where} must be {_type_name(tp)}, not a table")
        coerced = _coerce(value, tp, where)
        _check_bounds(coerced, fields[key].metadata, where)
        kwargs[key] = coerced
    return cls(**kwargs)


def sections_used(method: str) -> tuple[str, ...]:
    """The method sections a run of `method` reads (zopro's iteration 0 is first-order rloo by default)."""
    return {"zopro": ("zopro", "rloo")}.get(method, (METHOD_SECTIONS.get(method, method),))


def _check_paths(recipe: Recipe, source: str) -> None:
    """What becomes a path: the run's name (one folder) and the model cache (a folder, maybe not yet made)."""
    if not NAME_PATTERN.fullmatch(recipe.name):
        raise RecipeError(
            f"{source}: name = {_shown(recipe.name)} is not accepted; a name becomes one folder name: 1 to 100 "
            "letters, digits, '_', '.', '+' or '-', not starting with '.', '+' or '-'"
        )
    if recipe.model.cache_dir:
        path = Path(recipe.model.cache_dir).expanduser()
        try:
            existing = next(p for p in (path, *path.parents) if p.exists())
        except OSError as error:  # a name too long for the file system, ...
            raise RecipeError(
                f"{source}: model.cache_dir = {_shown(recipe.model.cache_dir)} cannot be a folder "
                f"({error.strerror}); name a folder (it is created if missing)"
            ) from None
        if not existing.is_dir():
            raise RecipeError(
                f"{source}: model.cache_dir = {_shown(recipe.model.cache_dir)}: {existing} is a file, "
                "not a folder; name a folder (it is created if missing)"
            )


def _check_recipe(recipe: Recipe, source: str, raw: dict[str, Any]) -> None:
    for target in recipe.log.report_to:
        if target not in REPORT_TO:
            raise RecipeError(
                f"{source}: log.report_to = {target!r} is not accepted; list any of {', '.join(REPORT_TO)}"
                f"{_suggest(target, list(REPORT_TO))}"
            )
    _check_paths(recipe, source)
    method = recipe.policy.method
    if method not in METHOD_SECTIONS:
        raise RecipeError(
            f"{source}: policy.method = {method!r} is not available in this version; available: "
            f"{', '.join(METHOD_SECTIONS)}"
        )
    allowed = set(sections_used(method))
    for other in _compare_methods(raw):
        allowed.update(sections_used(other))
    for other, section in METHOD_SECTIONS.items():
        if section in raw and section not in allowed:
            raise RecipeError(
                f"{source}: [{section}] sets {other} settings but policy.method is {method!r}; remove the "
                f"section, set policy.method = {other!r}, or list it in [compare] methods"
            )
    if recipe.task.name not in TASK_NAMES:
        raise RecipeError(
            f"{source}: task.name = {recipe.task.name!r} is not accepted; choose one of "
            f"{', '.join(TASK_NAMES)}{_suggest(recipe.task.name, list(TASK_NAMES))}"
        )
    if recipe.task.name == "dataset" and not recipe.data.path:
        raise RecipeError(
            f"{source}: task.name = 'dataset' needs data.path (a hub id or a local file or folder)"
        )
    if recipe.task.name != "dataset" and "data" in raw:
        raise RecipeError(f"{source}: [data] is only read when task.name = 'dataset'")
    if recipe.task.name == "dataset" and recipe.refine.judge == "gold":
        raise RecipeError(
            f"{source}: refine.judge = 'gold' needs a task with a gold scorer; use 'reward' or 'llm' "
            "with a dataset"
        )
    if recipe.refine.judge == "llm" and not recipe.refine.judge_model:
        raise RecipeError(
            f"{source}: refine.judge = 'llm' needs refine.judge_model (a local folder or a hub id)"
        )
    if method == "zopro" and recipe.zopro.sampler == "subspace" and recipe.zopro.first_iteration != "rloo":
        raise RecipeError(
            f"{source}: zopro.sampler = 'subspace' needs zopro.first_iteration = 'rloo' (the basis is built "
            "from a first-order iteration's gradients)"
        )
    if recipe.model.target_modules == []:
        raise RecipeError(f"{source}: model.target_modules must name at least one module")
    if recipe.train.prompts_per_update > recipe.task.train_prompts:
        raise RecipeError(
            f"{source}: train.prompts_per_update = {recipe.train.prompts_per_update} exceeds "
            f"task.train_prompts = {recipe.task.train_prompts}; lower it or add prompts"
        )


def split_variant(entry: str) -> tuple[str, list[str]]:
    """A [compare] entry: a method, or a method with settings of its own section, as in
    "zopro:sampler=subspace,lr=0.2" -> ("zopro", ["zopro.sampler=subspace", "zopro.lr=0.2"])."""
    method, _, settings = entry.partition(":")
    method = method.strip()
    section = METHOD_SECTIONS.get(method, method)
    overrides = [f"{section}.{part.strip()}" for part in settings.split(",") if part.strip()]
    return method, overrides


def split_method_list(text: str) -> list[str]:
    """A comma-separated list of [compare]-style entries, where an entry's own settings are also separated
    by commas: "rloo,zopro:sampler=subspace,lr=0.2,mezo" -> ["rloo", "zopro:sampler=subspace,lr=0.2", "mezo"]."""
    entries: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part and ":" not in part and entries and ":" in entries[-1]:
            entries[-1] += "," + part
        else:
            entries.append(part)
    return entries


def variant_label(entry: str) -> str:
    """A folder-safe name for a [compare] entry: "zopro:sampler=subspace" -> "zopro-sampler-subspace"."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", entry).strip("-") or "method"


def _compare_methods(raw: dict[str, Any]) -> list[str]:
    compare = raw.get("compare")
    if isinstance(compare, dict) and isinstance(compare.get("methods"), list):
        return [split_variant(m)[0] for m in compare["methods"] if isinstance(m, str)]
    return []


def parse_override(text: str) -> tuple[list[str], Any]:
    """`policy.method=zopro` -> (["policy", "method"], "zopro"); values are TOML, else a bare string."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r} must look like key.path=value (for example train.iterations=5)")
    key, raw_value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text!r} has an empty key; it must look like key.path=value")
    try:
        value = tomllib.loads(f"v = {raw_value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()
    except RecursionError:
        raise RecipeError(f"--set {key}=...: the value is nested too deeply to be a recipe value") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {part} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    compare = raw.get("compare")
    if compare is not None and not (
        isinstance(compare, dict)
        and set(compare) <= {"methods", "run_all"}
        and isinstance(compare.get("methods", []), list)
        and all(isinstance(m, str) and split_variant(m)[0] in METHODS for m in compare.get("methods", []))
        and isinstance(compare.get("run_all", False), bool)
    ):
        raise RecipeError(
            f"{source}: [compare] takes methods = a list drawn from {', '.join(METHODS)} (each optionally "
            'with settings of its section, as "zopro:sampler=subspace,lr=0.2") and run_all = true or false'
        )
    recipe = _build(Recipe, {k: v for k, v in raw.items() if k != "compare"}, "", source)
    _check_recipe(recipe, source, raw)
    for entry in (compare or {}).get("methods", []):
        method, own = split_variant(entry)
        if own:  # each variant must be a valid recipe too
            variant = copy.deepcopy(raw)
            variant["compare"] = {"methods": [split_variant(m)[0] for m in compare["methods"]]}
            apply_overrides(variant, [f"policy.method={method}", *own])
            recipe_from_dict(variant, f"{source} ([compare] methods entry {entry!r})")
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file; raises RecipeError with one sentence on any problem."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise RecipeError(f"{source}: no such recipe file")
    if path.is_dir():
        raise RecipeError(f"{source} is a folder; a recipe is a .toml file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"{source}: not a text file; a recipe is TOML") from None
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{source}: not valid TOML ({error})") from None
    except RecursionError:
        raise RecipeError(f"{source}: arrays or tables are nested too deeply to be a recipe") from None
    try:
        raw = apply_overrides(raw, overrides or [])
    except RecipeError as error:
        raise RecipeError(f"{source}: {error}") from None
    return recipe_from_dict(raw, source)


# --- writing the resolved recipe ----------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # a JSON string is a TOML basic string once DEL is escaped too (every other control is)
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as TOML (defaults filled in, overrides applied)."""
    data = recipe.to_dict()
    unused = set(METHOD_SECTIONS.values()) - set(sections_used(recipe.policy.method))
    if recipe.task.name != "dataset":
        unused.add("data")
    data = {k: v for k, v in data.items() if k not in unused}
    lines = ["# fully resolved by zopro: every default filled in, every --set applied"]
    tables = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables:
        lines.append("")
        lines.append(f"[{key}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"
