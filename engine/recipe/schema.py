"""The recipe schema: a typed dataclass per section, with a default, the accepted values and a line of
help for every field (`spec`). Loading, overrides, validation and writing are `engine.recipe.loading`.

Every user error becomes a `RecipeError` whose message is one sentence naming the file, the key path
and what is accepted. Nothing is created before a recipe validates.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

GROUP_METHODS = (
    "grpo",
    "dr_grpo",
    "dapo",
    "reinforce_pp",
)  # presets of one update (docs/method.md section 2b)
FIRST_ORDER_METHODS = ("rloo", "ppo", "online_dpo", *GROUP_METHODS)
REPORT_TO = ("tensorboard", "wandb")  # [log] report_to: engine/mirror.py
DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes: torch.float32, ...
DEVICES = ("auto", "cpu", "cuda")
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
    base: str = spec(
        "builtin:tiny",
        help="builtin:nano|tiny|small|base10m, a hub id, a local folder, or a GGUF file (path or pkg:PACKAGE/FILE.gguf)",
    )
    dtype: str = spec("float32", choices=DTYPES, help="dtype of the frozen base")
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
    gradient_checkpointing: str = spec(
        "auto",
        choices=("auto", "on", "off"),
        help="recompute each layer's activations in the backward instead of keeping them (auto: on when a "
        "pass would keep over 256 MiB)",
    )


@dataclass
class TaskConfig:
    name: str = spec(
        "builtin:sentiment", help="builtin:sentiment, builtin:reviews (real English) or dataset ([data])"
    )
    train_prompts: int = spec(512, low=1)
    eval_prompts: int = spec(64, low=1)
    sft_examples: int = spec(2048, low=8)
    preference_pairs: int = spec(2048, low=8)


@dataclass
class DataConfig:
    """A preference dataset, used when task.name = "dataset" (formats of engine/data/preference_data.py)."""

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
        from engine.data.preference_data import PreferenceSource

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
    eval_pairs: int = spec(256, low=1, help="held-out pairs of the reward model's accuracy")


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
class GRPOConfig:
    """The switches of the group methods (engine/training/methods/group.py, docs/method.md section 2b);
    each method's section starts from its preset: grpo (TRL GRPOTrainer with loss_type='grpo')."""

    lr: float = spec(5e-4, low=0.0, low_open=True)
    weight_decay: float = spec(0.0, low=0.0)
    max_grad_norm: float = spec(1.0, low=0.0, low_open=True)
    baseline: str = spec(
        "group_mean",
        choices=("leave_one_out", "group_mean", "none"),
        help="subtracted from each answer's reward: the mean of the other k - 1 (RLOO), of all k (GRPO)",
    )
    scale: str = spec(
        "group_std", choices=("none", "group_std", "batch_std"), help="advantages / std (batch_std: whiten)"
    )
    loss_aggregation: str = spec(
        "answer_token_mean",
        choices=("sequence", "answer_token_mean", "token_mean", "constant"),
        help="sequence: RLOO's sequence ratio; else token ratios averaged per answer (GRPO), over all "
        "tokens (DAPO), or summed / (answers x max_new_tokens) (Dr. GRPO)",
    )
    kl_penalty: str = spec(
        "loss",
        choices=("reward", "loss", "off"),
        help="beta = policy.kl_coef: k1 in the reward (RLOO), k3 per token in the loss (GRPO), or none",
    )
    epsilon: float = spec(0.2, low=0.0, low_open=True, high=1.0, help="ratio clipped below at 1 - epsilon")
    epsilon_high: float = spec(0.2, low=0.0, low_open=True, help="... and above at 1 + epsilon_high")
    updates_per_rollout: int = spec(1, low=1, high=64, help="mu: optimiser steps on each rollout")
    dynamic_sampling: bool = spec(False, help="drop groups whose rewards are all equal and refill (DAPO)")
    max_refills: int = spec(3, low=0, high=64, help="extra rollouts drawn at most to refill the batch")


def _preset(name: str, default: Any) -> Any:
    """GRPOConfig's switch `name` with a preset's default (same accepted values and help)."""
    return field(default=default, metadata=GRPOConfig.__dataclass_fields__[name].metadata)


@dataclass
class DrGRPOConfig(GRPOConfig):
    """Dr. GRPO (arXiv 2503.20783): no std, a constant normaliser (TRL scale_rewards='none', loss_type='dr_grpo')."""

    scale: str = _preset("scale", "none")
    loss_aggregation: str = _preset("loss_aggregation", "constant")


@dataclass
class DAPOConfig(GRPOConfig):
    """DAPO (arXiv 2503.14476): clip-higher, token-mean loss, no KL, dynamic sampling (TRL loss_type='dapo')."""

    loss_aggregation: str = _preset("loss_aggregation", "token_mean")
    kl_penalty: str = _preset("kl_penalty", "off")
    epsilon_high: float = _preset("epsilon_high", 0.28)
    dynamic_sampling: bool = _preset("dynamic_sampling", True)


@dataclass
class ReinforcePPConfig(GRPOConfig):
    """REINFORCE++ (arXiv 2501.03262): no group baseline, advantages whitened over the batch, k1 KL in the
    reward, token-mean loss."""

    baseline: str = _preset("baseline", "none")
    scale: str = _preset("scale", "batch_std")
    loss_aggregation: str = _preset("loss_aggregation", "token_mean")
    kl_penalty: str = _preset("kl_penalty", "reward")


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
    """Settings shared by mezo and zopro (paper-code defaults, docs/method.md section 3)."""

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
    estimator: str = spec(
        "two_sided",
        choices=("two_sided", "one_sided"),
        help="two_sided: (L+ - L-) / 2 eps, 2 passes a direction; one_sided: (L+ - L0) / eps, 1 pass (FZOO)",
    )
    fitness: str = spec(
        "raw",
        choices=("raw", "zscore", "loo"),
        help="the q estimates of an update as they are, z-scored, or leave-one-out (needs directions >= 2)",
    )
    updates_per_rollout: int = spec(1, low=1, high=64, help="zeroth-order updates on each rollout")


@dataclass
class MeZOConfig(ZerothOrderConfig):
    sampler: str = spec(
        "isotropic", choices=("isotropic", "block"), help="isotropic N(0, I) (MeZO) or one block (MeZO-BCD)"
    )


@dataclass
class ZOPrOConfig(ZerothOrderConfig):
    decay_schedule: str = spec("exp", choices=("exp", "linear"), help="d: 0.999 e^-s, or 0.999 - s/S")
    decay_start: float = spec(0.999, low=0.0, high=0.999999)
    first_iteration: str = spec(
        "rloo",
        choices=("rloo", *GROUP_METHODS, "mezo"),
        help="iteration 0 has no mu or v yet: a first-order method (rloo or a group method) or mezo",
    )
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
    subspace_gradients: str = spec(
        "batch",
        choices=("batch", "prompts"),
        help="what a first-order update snapshots for the basis: the batch's gradient, or each prompt's "
        "(prompts_per_update a step: set subspace_snapshots to prompts_per_update x updates_per_iteration)",
    )
    subspace_rank: int = spec(
        0,
        low=0,
        high=1024,
        help="keep the k leading singular directions of the snapshots (0: their whole span); the zeroth-"
        "order iterations then hold k x adapter size x 4 B",
    )
    subspace_weighting: str = spec(
        "uniform",
        choices=("uniform", "gradients"),
        help="subspace directions evenly over the span, or spread like the gradients (their SVD)",
    )
    subspace_refresh_every: int = spec(
        0, low=0, help="every M iterations a first-order iteration renews the subspace basis (0: never)"
    )
    probes: str = spec(
        "batch",
        choices=("batch", "rows"),
        help="batch: each direction probes the whole batch; rows (subspace sampler): each answer probes its "
        "own direction, N directions a pass, and directions counts rounds of them",
    )
    rounds_per_pass: int = spec(
        1,
        low=0,
        help="rows probes: rounds run together in one forward pass, the batch repeated (0: all of them); "
        "the same estimate in fewer, larger passes (a GPU runs them at about the cost of one)",
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
    judge_dtype: str = spec("bfloat16", choices=DTYPES)
    keep_fraction: float = spec(0.6, low=0.0, low_open=True, high=1.0)
    epochs: int = spec(2, low=0)
    batch_size: int = spec(16, low=1)
    lr: float = spec(1e-3, low=0.0, low_open=True)
    keep_close: bool = spec(True, help="reward <- alpha * previous + (1 - alpha) * refined")
    keep_close_alpha: float = spec(0.5, low=0.0, high=1.0)


@dataclass
class InterplayConfig:
    enabled: bool = spec(
        True, help="policy-reward interplay metrics during training (docs/method.md section 4)"
    )
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
    """Runaway detection after each held-out evaluation (engine/training/watchdog.py): `warning` events, not stops."""

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
    device: str = spec("auto", choices=DEVICES)
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
    grpo: GRPOConfig = spec(factory=GRPOConfig)
    dr_grpo: DrGRPOConfig = spec(factory=DrGRPOConfig)
    dapo: DAPOConfig = spec(factory=DAPOConfig)
    reinforce_pp: ReinforcePPConfig = spec(factory=ReinforcePPConfig)
    mezo: MeZOConfig = spec(factory=MeZOConfig)
    zopro: ZOPrOConfig = spec(factory=ZOPrOConfig)
    refine: RefineConfig = spec(factory=RefineConfig)
    interplay: InterplayConfig = spec(factory=InterplayConfig)
    eval: EvalConfig = spec(factory=EvalConfig)
    log: LogConfig = spec(factory=LogConfig)
    watchdog: WatchdogConfig = spec(factory=WatchdogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


METHOD_SECTIONS = {
    "rloo": "rloo",
    "ppo": "ppo",
    "online_dpo": "online_dpo",
    "mezo": "mezo",
    "zopro": "zopro",
    **{name: name for name in GROUP_METHODS},
}
TASK_NAMES = ("builtin:sentiment", "builtin:reviews", "dataset")
