"""A full RLOO step (rollout + update) of zopro next to TRL's RLOOTrainer on the same model, LoRA and batch
(issues 14, 27, 28); with `--method grpo` zopro's `grpo` preset next to TRL's GRPOTrainer (issue 26). Each side runs in its own process, sides alternating; TRL once with its gradient
checkpointing on (its default) and once with it off, both passed to RLOOConfig and read back from the model.

    PYTHONPATH=. python bench/trl_compare.py [--model builtin:base10m] [--rounds 2] [--steps 4] [--threads 1]
        [--trl-gradient-checkpointing on,off] [--trl-python PYTHON] [--no-real-run] [--json FILE]
        [--method rloo|grpo]

Prints one JSON object. Per side: seconds per step (median, first step of each process dropped), CPU seconds,
tokens generated per step (answer tokens up to EOS) and decode positions (rows x decode steps), seconds per
generated token, per phase (generation, scoring, update) its seconds and peak memory (peak RSS growth over the
phase and the absolute peak: Linux's resettable high-water mark), and the process's peak RSS (loading
included). `zopro_run` is a real `zopro run` of the same shapes: its logged `time/update_s` (a full step),
`time/policy_update_s` (the update) and `mem/update_peak_mib` per step. `work_per_step` says what differs.
TRL_GRADIENT_CHECKPOINTING=0 or 1 (older invocations) picks one setting instead of both."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.trl_sides import BETA, CLIP, LR, TARGETS, Shapes  # noqa: E402

WORK_PER_STEP = {
    "zopro": [
        "generation: zopro's own sampler (KV cache, merged LoRA weights on a float32 base), old log-probs "
        "read from the sampler's logits (no second forward)",
        "scoring: the reference is the SFT adapter on the shared base (one forward); the reward model is the "
        "reward adapter and score head on the same base (one forward, the same token ids)",
        "prompts: the same 16 prompts every step, in the same order",
        "update: forward and backward a chunk of rows at a time (`rows_per_backward`, gradient accumulation "
        "under the activation budget) instead of checkpointing the whole batch",
        "the stubbed side (`zopro`) uses the untrained base with fresh LoRA, like TRL's; `zopro_run` is a "
        "real run after SFT and reward training, so its answers end earlier (fewer tokens per step)",
    ],
    "trl": [
        "generation: transformers `generate` on the PEFT model with unmerged adapters",
        "scoring: old log-probs recomputed with a forward of the policy; the reference is the base with "
        "adapters disabled (a forward); the reward model is a separate AutoModelForSequenceClassification "
        "(a second copy of the base weights, no LoRA) on re-tokenised text",
        "prompts: drawn by TRL's shuffled RepeatSampler from the dataset (the same 16 prompts repeated)",
        "gradient checkpointing as the setting says: on recomputes each layer's activations in the backward",
    ],
}


def summarise(results: list[dict]) -> dict:
    """One side's processes -> medians over their steps (the first step of each process dropped)."""
    ok = [r for r in results if "steps" in r]
    steps = [step for r in ok for step in r["steps"][1:]]

    def median(key: str, digits: int = 3) -> float | None:
        values = [s[key] for s in steps if s.get(key) is not None]
        return round(statistics.median(values), digits) if values else None

    phases = {}
    for name in ("generation", "scoring", "update"):
        rows = [s["phases"][name] for s in steps if name in s.get("phases", {})]
        if rows:
            phases[name] = {
                "median_s": round(statistics.median(r["s"] for r in rows), 3),
                "peak_growth_mib": round(max(r["peak_growth_mib"] for r in rows), 1),
                "peak_mib": round(max(r["peak_mib"] for r in rows), 1),
            }
    summary = {
        "median_step_s": median("s"),
        "median_step_cpu_s": median("cpu_s"),
        "tokens_per_step": median("tokens", 1),
        "decode_positions_per_step": median("decode_positions", 1),
        "s_per_token_ms": round(1000 * median("s_per_token", 6), 3) if median("s_per_token", 6) else None,
        "phases": phases,
        "steps_s": [[round(s["s"], 3) for s in r["steps"]] for r in ok],
        "peak_rss_mib": max((r["peak_rss_mib"] for r in ok), default=None),
        "gradient_checkpointing": ok[0].get("gradient_checkpointing") if ok else None,
        **({"rows_per_backward": ok[0]["rows_per_backward"]} if ok and "rows_per_backward" in ok[0] else {}),
        "versions": ok[0].get("versions") if ok else None,
        "errors": [r["error"] for r in results if "error" in r],
    }
    return summary


def run_child(python: str, side: str, model: str, prompts_file: Path, shapes: Shapes, threads: int) -> dict:
    command = [python, str(ROOT / "bench" / "trl_sides.py"), side, model, str(prompts_file)]
    command += ["--threads", str(threads), "--shapes", json.dumps(shapes.__dict__)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1][len("RESULT ") :])


def real_run(model: str, shapes: Shapes, threads: int, folder: Path) -> dict:
    """A real `zopro run` (SFT, reward model, one iteration of `steps` RLOO updates) of the same shapes; its
    logged step times, read back from events.jsonl."""
    from engine.rundir.reader import read_events

    recipe = folder / "trl-compare.toml"
    recipe.write_text(
        f'name = "trl-compare"\nseed = 0\nthreads = {threads}\n\n[model]\nbase = "{model}"\nlora_rank = 8\n'
        f"lora_alpha = 16\ntarget_modules = {json.dumps(TARGETS)}\nmax_prompt_tokens = 32\n"
        f"max_new_tokens = {shapes.new_tokens}\n\n[task]\neval_prompts = 8\n\n[sft]\nsteps = {shapes.sft_steps}"
        f'\n\n[reward]\nsteps = {shapes.sft_steps}\n\n[policy]\nmethod = "{shapes.method}"\nkl_coef = {BETA}\n'
        f"kl_target = 0.0\nclip_range = {CLIP}\nmissing_eos_penalty = 0.0\n\n[{shapes.method}]\nlr = {LR}\n\n[train]\n"
        f"iterations = 1\nupdates_per_iteration = {shapes.steps}\nprompts_per_update = {shapes.prompts}\n"
        f"samples_per_prompt = {shapes.k}\n\n[refine]\nepochs = 0\n\n[eval]\nsamples_per_prompt = 1\n"
    )
    run_dir = folder / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", str(recipe), "--run-dir", str(run_dir), "-q"],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    rows = [
        e["metrics"]
        for e in read_events(run_dir)
        if e["type"] == "metrics" and "time/update_s" in e["metrics"]
    ]
    steps = rows[1:]  # the first step carries first-call costs, as on the other sides
    if not steps:
        return {"error": "no policy steps logged"}

    def median(values: list[float], digits: int = 3) -> float:
        return round(statistics.median(values), digits)

    rows_per_step = shapes.prompts * shapes.k
    tokens = [m["objective/response_length"] * rows_per_step for m in steps]
    return {
        "median_step_s": median([m["time/update_s"] for m in steps]),
        "median_update_s": median([m["time/policy_update_s"] for m in steps]),
        "median_rollout_s": median([m["time/update_s"] - m["time/policy_update_s"] for m in steps]),
        "tokens_per_step": median(tokens, 1),
        "s_per_token_ms": median([1000 * m["time/update_s"] / t for m, t in zip(steps, tokens, strict=True)]),
        "update_peak_growth_mib": max(m["mem/update_peak_mib"] for m in steps),
        "steps_s": [round(m["time/update_s"], 3) for m in rows],
        "note": "rollout_s is time/update_s - time/policy_update_s (sampling, reference and reward passes, "
        "gold scoring and the step's bookkeeping)",
    }


def git_commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or None


def compare(
    model: str,
    *,
    rounds: int,
    shapes: Shapes,
    threads: int,
    trl_settings: list[bool],
    trl_python: str,
    with_real_run: bool = True,
) -> dict:
    from engine.data.tasks import make_task
    from engine.recipe import recipe_from_dict
    from engine.training.models import quiet_transformers, resolve_base

    os.environ["HF_HUB_OFFLINE"] = "1"
    quiet_transformers()
    task = make_task(recipe_from_dict({}))
    base = resolve_base(model, task.corpus(), 0, "")  # untrained, as `zopro bench methods` uses it
    sides = {"zopro": (sys.executable, "zopro")}
    for on in trl_settings:
        sides[f"trl_gc_{'on' if on else 'off'}"] = (trl_python, f"trl:{int(on)}")
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory(prefix="trl-compare-") as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(task.prompts(shapes.prompts, "bench")))
        for _ in range(rounds):
            for name, (python, side) in sides.items():
                runs[name].append(run_child(python, side, base, prompts_file, shapes, threads))
        report: dict = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "commit": git_commit(),
            "model": model,
            "threads": threads,
            "rounds": rounds,
            "shapes": shapes.__dict__,
            "settings": {
                "trl_gradient_checkpointing": trl_settings,
                "zopro_gradient_checkpointing": False,
            },
            "sides": {name: summarise(results) for name, results in runs.items()},
        }
        zopro_side = report["sides"]["zopro"]
        if zopro_side["gradient_checkpointing"] is not None:
            report["settings"]["zopro_gradient_checkpointing"] = zopro_side["gradient_checkpointing"]
        if with_real_run:
            report["sides"]["zopro_run"] = real_run(model, shapes, threads, Path(tmp))
    report["ratios"] = ratios(report["sides"])
    report["work_per_step"] = WORK_PER_STEP
    return report


def ratios(sides: dict) -> dict:
    """zopro / TRL for each TRL setting: step time, CPU time, time per token, update peak, peak RSS."""
    zopro, out = sides["zopro"], {}
    for name, trl in sides.items():
        if not name.startswith("trl"):
            continue
        pairs = {
            "step_s": (zopro["median_step_s"], trl["median_step_s"]),
            "step_cpu_s": (zopro["median_step_cpu_s"], trl["median_step_cpu_s"]),
            "s_per_token": (zopro["s_per_token_ms"], trl["s_per_token_ms"]),
            "update_peak_growth": (
                zopro["phases"].get("update", {}).get("peak_growth_mib"),
                trl["phases"].get("update", {}).get("peak_growth_mib"),
            ),
            "peak_rss": (zopro["peak_rss_mib"], trl["peak_rss_mib"]),
        }
        out[f"zopro_x_{name}"] = {key: round(a / b, 3) if a and b else None for key, (a, b) in pairs.items()}
    return out


def default_trl_python() -> str:
    import importlib.util

    return sys.executable if importlib.util.find_spec("trl") else "/work/trl-venv/bin/python"


def trl_settings_from(text: str) -> list[bool]:
    if os.environ.get("TRL_GRADIENT_CHECKPOINTING") in ("0", "1"):
        return [os.environ["TRL_GRADIENT_CHECKPOINTING"] == "1"]
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words or any(w not in ("on", "off") for w in words):
        raise SystemExit(f"--trl-gradient-checkpointing {text!r}: accepted: on, off or on,off")
    return [w == "on" for w in words]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:base10m")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--sft-steps", type=int, default=100, help="the real run's SFT and reward steps")
    parser.add_argument(
        "--method", default="rloo", choices=("rloo", "grpo"), help="vs RLOOTrainer or GRPOTrainer"
    )
    parser.add_argument("--trl-gradient-checkpointing", default="on,off")
    parser.add_argument("--trl-python", default=None)
    parser.add_argument("--no-real-run", action="store_true", help="skip the real `zopro run`")
    parser.add_argument("--json", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    shapes = Shapes(args.prompts, args.samples, args.new_tokens, args.steps, args.sft_steps, args.method)
    report = compare(
        args.model,
        rounds=args.rounds,
        shapes=shapes,
        threads=args.threads,
        trl_settings=trl_settings_from(args.trl_gradient_checkpointing),
        trl_python=args.trl_python or default_trl_python(),
        with_real_run=not args.no_real_run,
    )
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
