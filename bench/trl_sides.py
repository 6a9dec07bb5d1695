"""The two sides of bench/trl_compare.py, each run in a fresh process:

    python bench/trl_sides.py zopro|trl:1|trl:0 MODEL_FOLDER PROMPTS_JSON --threads N --shapes JSON

Prints `RESULT {json}`: per step its seconds, CPU seconds, tokens generated, decode positions and, per phase
(generation, scoring, update), seconds and peak memory; the process's peak RSS; the gradient checkpointing
the model really ran with. `trl:1` is TRL's RLOOTrainer (GRPOTrainer with shapes.method = "grpo") with
gradient checkpointing on, `trl:0` off. zopro's `grpo` preset is matched by GRPOTrainer with loss_type="grpo",
scale_rewards="group", beta = BETA (k3 in the loss), epsilon = CLIP, num_iterations = 1."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETA, CLIP, LR = 0.05, 0.2, 5e-4


@dataclass
class Shapes:
    prompts: int = 16
    k: int = 4  # answers per prompt
    new_tokens: int = 48
    steps: int = 4  # per process
    sft_steps: int = 100  # the real run's SFT and reward-model steps
    method: str = "rloo"  # rloo (TRL RLOOTrainer) or grpo (TRL GRPOTrainer)


class Phases:
    """One phase at a time (generation, scoring, update); per step each phase's seconds, peak RSS growth over
    the phase and absolute peak RSS (engine.training.telemetry.PhasePeak: Linux's resettable high-water mark)."""

    def __init__(self) -> None:
        import torch

        from engine.training.telemetry import PhasePeak

        self.make_peak = lambda: PhasePeak(torch.device("cpu"))
        self.current: tuple[str, object, float] | None = None
        self.step: dict[str, dict] = {}

    def start(self, name: str) -> None:
        self.stop()
        peak = self.make_peak()
        peak.__enter__()
        self.current = (name, peak, time.perf_counter())

    def stop(self) -> None:
        if self.current is None:
            return
        name, peak, started = self.current
        peak.__exit__(None, None, None)
        entry = self.step.setdefault(name, {"s": 0.0, "peak_growth_mib": 0.0, "peak_mib": 0.0})
        entry["s"] += time.perf_counter() - started
        entry["peak_growth_mib"] = max(entry["peak_growth_mib"], peak.growth_mib)
        entry["peak_mib"] = max(entry["peak_mib"], peak.peak)
        self.current = None

    def end_step(self) -> dict:
        self.stop()
        step, self.step = self.step, {}
        return step


def step_record(seconds: float, cpu: float, tokens: int, positions: int, phases: dict) -> dict:
    return {
        "s": seconds,
        "cpu_s": cpu,
        "tokens": tokens,
        "decode_positions": positions,
        "s_per_token": seconds / max(tokens, 1),
        "phases": phases,
    }


def zopro_side(model: str, prompts: list[str], shapes: Shapes) -> dict:
    import torch

    import engine.training.rollout as rollout_module
    from engine.recipe import recipe_from_dict
    from engine.training import activation_checkpointing
    from engine.training.accumulation import rows_per_backward
    from engine.training.methods import make_update
    from engine.training.methods.context import MethodContext
    from engine.training.models import load_preference_model
    from engine.training.row_chunks import row_chunks
    from engine.training.telemetry import Counters

    recipe = recipe_from_dict(
        {
            "model": {"base": model, "lora_rank": 8, "lora_alpha": 16, "target_modules": TARGETS},
            "policy": {"method": shapes.method, "clip_range": CLIP, "kl_coef": BETA},
            shapes.method: {
                "lr": LR,
                **({"epsilon": CLIP, "epsilon_high": CLIP} if shapes.method == "grpo" else {}),
            },
        },
        "<trl-compare>",
    )
    preference_model = load_preference_model(
        model, dtype="float32", device=torch.device("cpu"), lora_rank=8, lora_alpha=16.0,
        target_modules=TARGETS, seed=0,
    )  # fmt: skip
    counters = Counters()
    counters.enter("bench")

    def unavailable(*args):
        raise RuntimeError("a benchmark has no run directory")

    context = MethodContext(
        models=preference_model, counters=counters, recipe=recipe, current_iteration=lambda: 0, warn=unavailable,
        score_policy=unavailable, fresh_rollout=unavailable,
    )  # fmt: skip
    update = make_update(shapes.method, context)
    phases = Phases()
    sample = rollout_module.sample_with_logprobs

    def timed_sample(*args, **kwargs):  # the rollout's generation; what follows it is scoring
        phases.start("generation")
        out = sample(*args, **kwargs)
        phases.start("scoring")
        return out

    rollout_module.sample_with_logprobs = timed_sample
    recomputed = []  # layers checkpointed in the updates (zopro's own checkpointing, not transformers')
    checkpoint = activation_checkpointing.checkpoint
    activation_checkpointing.checkpoint = lambda *a, **kw: recomputed.append(1) or checkpoint(*a, **kw)
    steps = []
    for step in range(shapes.steps):
        started, started_cpu = time.perf_counter(), time.process_time()
        rollout = rollout_module.collect_rollout(
            preference_model, prompts, k=shapes.k, kl_coef=BETA, missing_eos_penalty=0.0, max_new_tokens=shapes.new_tokens,
            max_prompt_tokens=32, temperature=1.0, generator=torch.Generator().manual_seed(step),
            counters=counters,
        )  # fmt: skip
        phases.start("update")
        update.update(rollout, update_index=step, step_in_iteration=step)
        step_phases = phases.end_step()
        mask = rollout.sequences.response_mask
        steps.append(
            step_record(
                time.perf_counter() - started,
                time.process_time() - started_cpu,
                int(mask.sum()),
                mask.numel(),
                step_phases,
            )
        )
    rows, width = rollout.sequences.input_ids.shape
    first = row_chunks(rows, rows_per_backward(preference_model, width))[0]  # the chunks the update ran
    return {
        "steps": steps,
        "gradient_checkpointing": bool(recomputed),
        "rows_per_backward": first.stop - first.start,
    }


def trl_side(model: str, prompts: list[str], shapes: Shapes, gradient_checkpointing: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.padding_side = "left"
    reward = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    reward.config.pad_token_id = tokenizer.pad_token_id
    phases = Phases()
    steps: list[dict] = []
    generated: list[tuple[int, int]] = []  # per step: answer tokens, rows x decode steps
    seen_checkpointing: list[bool] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started, self.started_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step_phases = phases.end_step()
            tokens, positions = generated[-1] if generated else (0, 0)
            seconds, cpu = time.perf_counter() - self.started, time.process_time() - self.started_cpu
            steps.append(step_record(seconds, cpu, tokens, positions, step_phases))
            seen_checkpointing.append(bool(getattr(model, "is_gradient_checkpointing", False)))

    grpo = shapes.method == "grpo"
    extra = {"loss_type": "grpo", "scale_rewards": "group"} if grpo else {}
    config = (GRPOConfig if grpo else RLOOConfig)(
        **extra,
        output_dir=str(Path("/tmp") / f"trl-compare-out-{gradient_checkpointing:d}"),
        per_device_train_batch_size=shapes.prompts * shapes.k,
        num_generations=shapes.k,
        max_completion_length=shapes.new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=BETA,
        epsilon=CLIP,
        learning_rate=LR,
        num_iterations=1,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        gradient_checkpointing=gradient_checkpointing,  # TRL's default is True
        max_steps=shapes.steps,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_dropout=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = (GRPOTrainer if grpo else RLOOTrainer)(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts * (shapes.steps * shapes.k + 4)}),
        processing_class=tokenizer,
        reward_processing_classes=tokenizer,
        peft_config=LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"
        ),
        callbacks=[Timer()],
    )
    generate, prepare_inputs = trainer._generate, trainer._prepare_inputs

    def timed_generate(batch_prompts):  # TRL's generation; then old log-probs, reference and reward: scoring
        phases.start("generation")
        out = generate(batch_prompts)
        phases.start("scoring")
        completions = out[1]
        generated.append((sum(len(c) for c in completions), len(completions) * max(map(len, completions))))
        return out

    def timed_prepare_inputs(batch):  # returns the scored batch: the loss, backward and step follow
        out = prepare_inputs(batch)
        phases.start("update")
        return out

    trainer._generate, trainer._prepare_inputs = timed_generate, timed_prepare_inputs
    trainer.train()
    return {"steps": steps, "gradient_checkpointing": all(seen_checkpointing) and bool(seen_checkpointing)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("side")
    parser.add_argument("model")
    parser.add_argument("prompts_file")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", default="{}")
    args = parser.parse_args()
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from engine.training.telemetry import peak_rss_mib

    shapes = Shapes(**json.loads(args.shapes))
    prompts = json.loads(Path(args.prompts_file).read_text())
    if args.side == "zopro":
        result = zopro_side(args.model, prompts, shapes)
    elif args.side in ("trl:0", "trl:1"):
        result = trl_side(args.model, prompts, shapes, gradient_checkpointing=args.side == "trl:1")
    else:
        raise SystemExit(f"side {args.side!r}: accepted: zopro, trl:1, trl:0")
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    if args.side != "zopro":
        import peft
        import trl

        result["versions"].update(trl=trl.__version__, peft=peft.__version__)
    print("RESULT " + json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
