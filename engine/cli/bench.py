"""`zopro bench methods`: what zeroth-order buys, measured. For each method, in a fresh process: peak memory
of the policy-update phase, time per update (median) and forward passes per update, on one rollout size;
also the rollout's time and peak memory, a full step (rollout + update) and the sampler's tokens/s next to
transformers' `generate` on the same batch."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from engine.recipe.schema import GROUP_METHODS

BENCH_METHODS = ("rloo", "ppo", "online_dpo", *GROUP_METHODS, "mezo", "zopro")


@dataclass
class BenchConfig:
    model: str = "builtin:base10m"
    prompts: int = 16
    samples_per_prompt: int = 4
    max_new_tokens: int = 48
    updates: int = 5
    warmup: int = 1
    lora_rank: int = 8
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: torch's default)
    gradient_checkpointing: str = "auto"  # model.gradient_checkpointing: auto, on or off


def worker(method: str, config: BenchConfig) -> dict:
    """Runs in its own process: load, make one rollout, then time `updates` policy updates on it."""
    import torch

    from engine.data.chat_task import speak_through_chat_template
    from engine.data.tasks import make_task
    from engine.recipe import apply_overrides, recipe_from_dict, split_variant
    from engine.training.methods import make_update
    from engine.training.methods.context import MethodContext
    from engine.training.methods.zeroth_order import FixedDirections, ZerothOrderUpdate
    from engine.training.methods.zeroth_order.samplers import (
        BlockSampler,
        GradientSnapshots,
        IsotropicSampler,
        SubspaceSampler,
        ZoproSampler,
        layer_blocks,
    )
    from engine.training.models import load_preference_model, quiet_transformers, resolve_base, resolve_device
    from engine.training.rollout import collect_rollout
    from engine.training.telemetry import Counters, PhasePeak, rss_mib

    quiet_transformers()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    label = method
    method, variant = split_variant(label)
    recipe = recipe_from_dict(
        apply_overrides(
            {
                "seed": config.seed,
                "device": config.device,
                "model": {
                    "base": config.model,
                    "lora_rank": config.lora_rank,
                    "lora_alpha": 2.0 * config.lora_rank,
                    "max_new_tokens": config.max_new_tokens,
                    "max_prompt_tokens": 64,  # room for a real model's chat template
                    "dtype": config.dtype,
                    "gradient_checkpointing": config.gradient_checkpointing,
                },
                "policy": {"method": method},
                "train": {
                    "prompts_per_update": config.prompts,
                    "samples_per_prompt": config.samples_per_prompt,
                    "updates_per_iteration": config.updates + config.warmup,
                },
            },
            variant,
        ),
        "<bench>",
    )
    task = make_task(recipe)
    device = resolve_device(config.device)
    base = resolve_base(config.model, task.corpus(), config.seed, "")  # untrained: full-length answers
    models = load_preference_model(
        base,
        dtype=config.dtype,
        device=device,
        lora_rank=config.lora_rank,
        lora_alpha=2.0 * config.lora_rank,
        target_modules=recipe.model.target_modules,
        seed=config.seed,
        gradient_checkpointing=recipe.model.gradient_checkpointing,
    )
    task = speak_through_chat_template(task, models.tokenizer, recipe.model.max_prompt_tokens)
    counters = Counters()
    counters.enter("bench")

    def unavailable(*args):
        raise RuntimeError("a benchmark has no run directory, adapter history or held-out prompts")

    context = MethodContext(  # iteration 1 of a run that has none of a run's services
        models=models,
        counters=counters,
        recipe=recipe,
        current_iteration=lambda: 1,
        warn=unavailable,
        score_policy=unavailable,
        fresh_rollout=unavailable,
    )
    sampler_state_mib = 0.0
    if method != "zopro":
        update = make_update(method, context)
    else:  # iteration 1: informed directions from a synthetic mu, v and basis, handed to the update
        gen = torch.Generator().manual_seed(config.seed)
        params = models.adapter_parameters("policy")
        mu = {n: (0.01 * torch.randn(p.shape, generator=gen)).to(device) for n, p in params.items()}
        v = {n: (0.01 * torch.randn(p.shape, generator=gen)).to(device) for n, p in params.items()}
        if recipe.zopro.sampler == "subspace":
            snapshots = GradientSnapshots(recipe.zopro.subspace_snapshots)
            for _ in range(recipe.zopro.subspace_snapshots):
                snapshots.add(
                    {n: torch.randn(p.shape, generator=gen).to(device) for n, p in params.items()}, params
                )
            weighted = recipe.zopro.subspace_weighting == "gradients"
            basis = snapshots.subspace_basis(recipe.zopro.subspace_rank, weighted)
            snapshots.clear()
            sampler_state_mib = basis.numel() * 4 / 2**20  # held between updates, like Adam's moments
            shapes = {n: p.shape for n, p in params.items()}
            sampler = SubspaceSampler(basis, shapes, norm=1.0, mu=mu, v=v, weighted=weighted)
        elif recipe.zopro.sampler == "zopro":
            sampler = ZoproSampler(mu, v, decay=0.999)
        elif recipe.zopro.sampler == "block":
            sampler = BlockSampler(layer_blocks(list(params)))
        else:
            sampler = IsotropicSampler()
        update = ZerothOrderUpdate(context, method, FixedDirections(sampler))  # no mu: no premise check
    prompts = task.prompts(config.prompts, "bench")

    def synced() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def rollout_once():
        return collect_rollout(
            models,
            prompts,
            k=config.samples_per_prompt,
            kl_coef=0.05,
            missing_eos_penalty=0.0,
            max_new_tokens=config.max_new_tokens,
            max_prompt_tokens=recipe.model.max_prompt_tokens,
            temperature=1.0,
            generator=torch.Generator().manual_seed(config.seed),
            counters=counters,
        )

    rollout_once()  # warm-up: first-call costs stay out of the timings
    with PhasePeak(device) as rollout_phase:
        started = synced()
        rollout = rollout_once()
        rollout_s = synced() - started
    sampling = sampling_speed(models, prompts, config, synced)
    tokens = int(rollout.sequences.attention_mask.sum())
    baseline_rss = rss_mib()
    times, peaks, passes, passed_tokens = [], [], [], []
    for step in range(config.warmup + config.updates):
        before, tokens_before = counters.forward_passes, counters.tokens
        started = synced()
        with PhasePeak(device) as phase:
            update.update(rollout, update_index=step, step_in_iteration=step)
        if step >= config.warmup:
            times.append(synced() - started)
            peaks.append(phase.growth_mib)
            passes.append(counters.forward_passes - before)
            passed_tokens.append(counters.tokens - tokens_before)
    time_per_update = statistics.median(times)
    result = {
        "peak_update_mem_mib": round(max(peaks), 2),
        "time_per_update_s": round(time_per_update, 4),
        "forward_passes_per_update": statistics.median(passes),
        "forward_tokens_per_update": statistics.median(passed_tokens),  # rows probed together count each copy
        "rollout_s": round(rollout_s, 3),
        "step_s": round(rollout_s + time_per_update, 4),  # a full step: rollout + update
        "peak_rollout_mem_mib": round(rollout_phase.growth_mib, 2),
        **sampling,
        "sequences": len(rollout.sequences.responses),
        "sequence_width": int(rollout.sequences.input_ids.shape[1]),
        "tokens_per_update": tokens,
        "rss_after_load_mib": round(baseline_rss, 1),
        "sampler_state_mib": round(sampler_state_mib, 2),
        "memory_measure": "cuda max_memory_allocated growth" if device.type == "cuda" else "peak RSS growth",
        "device": str(device),
    }
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    return result


def sampling_speed(models, prompts: list[str], config: BenchConfig, synced) -> dict:
    """Tokens per second of the rollout's sampler and of transformers' `generate` (pure sampling: no
    top-k/top-p) on the same model, adapter and batch; a token is one row's one decode step."""
    import torch

    from engine.training.rollout import encode_prompts, sample
    from engine.training.telemetry import Counters

    repeated = [p for p in prompts for _ in range(config.samples_per_prompt)]
    with models.adapter("policy"):
        started = synced()
        seqs = sample(
            models,
            repeated,
            max_new_tokens=config.max_new_tokens,
            max_prompt_tokens=64,
            temperature=1.0,
            generator=torch.Generator().manual_seed(config.seed + 1),
            counters=Counters(),
        )
        sample_s = synced() - started
        input_ids, mask = encode_prompts(models, repeated, 64)
        torch.manual_seed(config.seed + 1)
        started = synced()
        with torch.no_grad():
            out = models.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=config.max_new_tokens,
                pad_token_id=models.tokenizer.pad_token_id,
                eos_token_id=models.tokenizer.eos_token_id,
            )
        generate_s = synced() - started
    sampled = seqs.response_ids.numel()
    generated = out[:, input_ids.shape[1] :].numel()
    return {
        "sample_s": round(sample_s, 4),
        "sample_tokens_per_s": round(sampled / sample_s, 1),
        "generate_s": round(generate_s, 4),
        "generate_tokens_per_s": round(generated / generate_s, 1),
    }


def run_methods(methods: list[str], config: BenchConfig) -> dict:
    """Each method in a fresh subprocess, so peaks do not leak between methods."""
    results = {}
    for method in methods:
        payload = json.dumps({"method": method, "config": config.__dict__})
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.run(
            [sys.executable, "-m", "engine.cli.bench", payload], capture_output=True, text=True, env=env
        )
        lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
        if process.returncode != 0 or not lines:
            tail = (process.stderr.strip().splitlines() or ["no output"])[-1]
            results[method] = {"error": tail}
            continue
        results[method] = json.loads(lines[-1])
    return {"methods": results, "config": config.__dict__}


def bench_table(report: dict):
    from rich.table import Table

    table = Table(
        title=f"policy-update phase, {report['config']['model']}", header_style="bold", title_justify="left"
    )
    columns = ("method", "update MiB", "s / update", "fwd / update", "mem x rloo", "time x rloo")
    columns += ("rollout MiB", "s / step", "sample tok/s", "generate tok/s")
    for column in columns:
        if column == "method":
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, justify="right")
    reference = report["methods"].get("rloo", {})
    for method, row in report["methods"].items():
        if "error" in row:
            table.add_row(method, "error: " + row["error"][:60], *[""] * (len(columns) - 2))
            continue
        mem_ratio = (
            row["peak_update_mem_mib"] / reference["peak_update_mem_mib"]
            if reference.get("peak_update_mem_mib")
            else None
        )
        time_ratio = (
            row["time_per_update_s"] / reference["time_per_update_s"]
            if reference.get("time_per_update_s")
            else None
        )
        table.add_row(
            method,
            f"{row['peak_update_mem_mib']:.1f}",
            f"{row['time_per_update_s']:.3f}",
            f"{row['forward_passes_per_update']:g}",
            "-" if mem_ratio is None else f"{mem_ratio:.2f}",
            "-" if time_ratio is None else f"{time_ratio:.2f}",
            f"{row['peak_rollout_mem_mib']:.1f}",
            f"{row['step_s']:.3f}",
            f"{row['sample_tokens_per_s']:.0f}",
            f"{row['generate_tokens_per_s']:.0f}",
        )
    return table


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    print(json.dumps(worker(request["method"], BenchConfig(**request["config"]))))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (torch threads) so the parent's timing is clean
