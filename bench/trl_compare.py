"""A full RLOO step (rollout + update) of zopro next to TRL's RLOOTrainer on the same model, LoRA and batch
(issue 14). TRL lives in its own venv, so each side runs in its own process; the sides alternate.

    PYTHONPATH=. python bench/trl_compare.py --trl-python /work/trl-venv/bin/python [--model builtin:base10m]
        [--rounds 2] [--steps 4] [--threads 1]

Prints one JSON object: per side the median seconds per step (first step of each run dropped) and peak RSS.
Same on both sides: the untrained built-in model, LoRA r=8 / alpha 16 on q,k,v,o,gate,up,down (TRL refuses
LoRA on lm_head), 16 prompts x 4 answers, 48 new tokens, temperature 1, no top-k/top-p, beta 0.05, clip 0.2,
lr 5e-4, one update per rollout, one CPU thread. What differs: see README (Large vocabularies and TRL)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS, K, NEW_TOKENS, BETA, CLIP, LR = 16, 4, 48, 0.05, 0.2, 5e-4
GRADIENT_CHECKPOINTING = os.environ.get("TRL_GRADIENT_CHECKPOINTING", "1") == "1"  # TRL's default: on


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def zopro_side(model: str, prompts: list[str], steps: int) -> dict:
    import torch

    from engine.recipe import recipe_from_dict
    from engine.training.methods import make_update
    from engine.training.methods.context import MethodContext
    from engine.training.models import load_preference_model
    from engine.training.rollout import collect_rollout
    from engine.training.telemetry import Counters

    recipe = recipe_from_dict(
        {
            "model": {"base": model, "lora_rank": 8, "lora_alpha": 16.0, "target_modules": TARGETS},
            "policy": {"method": "rloo", "clip_range": CLIP},
            "rloo": {"lr": LR},
        },
        "<trl-compare>",
    )
    models = load_preference_model(
        model,
        dtype="float32",
        device=torch.device("cpu"),
        lora_rank=8,
        lora_alpha=16.0,
        target_modules=TARGETS,
        seed=0,
    )
    counters = Counters()
    counters.enter("bench")

    def unavailable(*args):
        raise RuntimeError("no run")

    context = MethodContext(
        models=models,
        counters=counters,
        recipe=recipe,
        current_iteration=lambda: 0,
        warn=unavailable,
        score_policy=unavailable,
        fresh_rollout=unavailable,
    )
    update = make_update("rloo", context)
    times, cpu = [], []
    for step in range(steps):
        started, started_cpu = time.perf_counter(), time.process_time()
        rollout = collect_rollout(
            models,
            prompts,
            k=K,
            kl_coef=BETA,
            missing_eos_penalty=0.0,
            max_new_tokens=NEW_TOKENS,
            max_prompt_tokens=32,
            temperature=1.0,
            generator=torch.Generator().manual_seed(step),
            counters=counters,
        )
        update.update(rollout, update_index=step, step_in_iteration=step)
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return {"step_times_s": times, "step_cpu_s": cpu}


def trl_side(model: str, prompts: list[str], steps: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.padding_side = "left"
    reward = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    reward.config.pad_token_id = tokenizer.pad_token_id
    times: list[float] = []
    cpu: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started, self.started_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started)
            cpu.append(time.process_time() - self.started_cpu)

    config = RLOOConfig(
        output_dir="/tmp/trl-compare-out",
        per_device_train_batch_size=PROMPTS * K,
        num_generations=K,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=BETA,
        epsilon=CLIP,
        learning_rate=LR,
        num_iterations=1,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        max_steps=steps,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_dropout=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = RLOOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts * (steps * K + 4)}),
        processing_class=tokenizer,
        reward_processing_classes=tokenizer,
        peft_config=LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"
        ),
        callbacks=[Timer()],
    )
    trainer.train()
    return {"step_times_s": times, "step_cpu_s": cpu}


def child(side: str, model: str, prompts_file: str, steps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    prompts = json.loads(Path(prompts_file).read_text())
    result = (zopro_side if side == "zopro" else trl_side)(model, prompts, steps)
    import torch as _t

    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    result["versions"] = {"torch": _t.__version__, "transformers": transformers.__version__}
    if side == "trl":
        import peft
        import trl

        result["versions"].update(trl=trl.__version__, peft=peft.__version__)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trl-python", default="/work/trl-venv/bin/python")
    parser.add_argument("--model", default="builtin:base10m")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, model, prompts_file = args.child
        child(side, model, prompts_file, args.steps, args.threads)
        return

    os.environ["HF_HUB_OFFLINE"] = "1"
    from engine.data.tasks import make_task
    from engine.recipe import recipe_from_dict
    from engine.training.models import quiet_transformers, resolve_base

    quiet_transformers()
    task = make_task(recipe_from_dict({}))
    model = resolve_base(args.model, task.corpus(), 0, "")  # untrained, as `zopro bench methods` uses it
    prompts_file = Path("/tmp/trl-compare-prompts.json")
    prompts_file.write_text(json.dumps(task.prompts(PROMPTS, "bench")))
    runs: dict[str, list[dict]] = {"zopro": [], "trl": []}
    for _ in range(args.rounds):
        for side, python in (("zopro", sys.executable), ("trl", args.trl_python)):
            command = [python, __file__, "--steps", str(args.steps), "--threads", str(args.threads)]
            command += ["--child", side, model, str(prompts_file)]
            env = {**os.environ, "PYTHONPATH": str(ROOT) if side == "zopro" else ""}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                runs[side].append({"error": (done.stderr.strip().splitlines() or ["no output"])[-1]})
                continue
            runs[side].append(json.loads(lines[-1][len("RESULT ") :]))
    report = {"model": args.model, "threads": args.threads}
    for side, results in runs.items():
        ok = [r for r in results if "step_times_s" in r]
        steps = [t for r in ok for t in r["step_times_s"][1:]]
        cpu = [t for r in ok for t in r["step_cpu_s"][1:]]
        report[side] = {
            "median_step_s": round(statistics.median(steps), 3) if steps else None,
            "median_step_cpu_s": round(statistics.median(cpu), 3) if cpu else None,
            "steps_s": [[round(t, 3) for t in r["step_times_s"]] for r in ok],
            "peak_rss_mib": max((r["peak_rss_mib"] for r in ok), default=None),
            "versions": ok[0]["versions"] if ok else None,
            "errors": [r["error"] for r in results if "error" in r],
        }
    for key in ("median_step_s", "median_step_cpu_s"):
        if report["zopro"][key] and report["trl"][key]:
            report[f"zopro_x_trl_{key[7:]}"] = round(report["zopro"][key] / report["trl"][key], 3)
    report["trl_gradient_checkpointing"] = GRADIENT_CHECKPOINTING
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
