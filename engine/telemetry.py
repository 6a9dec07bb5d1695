"""Telemetry: forward-pass and token counters per stage, wall time, and process/GPU memory."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import psutil
import torch


@dataclass
class Counters:
    """Compute counters: batched forward passes and tokens processed, in total and for the current stage.

    A forward pass is one batched forward of the model (a whole generation counts as one); backward
    passes are counted apart. These are the compute axis on which methods are compared.
    """

    forward_passes: int = 0
    backward_passes: int = 0
    tokens: int = 0
    stage: str = ""
    per_stage: dict[str, dict[str, int]] = field(default_factory=dict)

    def enter(self, stage: str) -> None:
        self.stage = stage
        self.per_stage.setdefault(stage, {"forward_passes": 0, "backward_passes": 0, "tokens": 0})

    def add(self, forward_passes: int = 0, tokens: int = 0, backward_passes: int = 0) -> None:
        self.forward_passes += forward_passes
        self.backward_passes += backward_passes
        self.tokens += tokens
        if self.stage:
            bucket = self.per_stage[self.stage]
            bucket["forward_passes"] += forward_passes
            bucket["backward_passes"] += backward_passes
            bucket["tokens"] += tokens

    def metrics(self) -> dict[str, int]:
        stage = self.per_stage.get(self.stage, {})
        return {
            "compute/forward_passes": self.forward_passes,
            "compute/backward_passes": self.backward_passes,
            "compute/tokens": self.tokens,
            "compute/stage_forward_passes": stage.get("forward_passes", 0),
            "compute/stage_tokens": stage.get("tokens", 0),
        }

    def state_dict(self) -> dict:
        return {"forward_passes": self.forward_passes, "backward_passes": self.backward_passes,
                "tokens": self.tokens, "stage": self.stage, "per_stage": self.per_stage}

    def load_state_dict(self, state: dict) -> None:
        self.forward_passes = state["forward_passes"]
        self.backward_passes = state["backward_passes"]
        self.tokens = state["tokens"]
        self.stage = state["stage"]
        self.per_stage = {k: dict(v) for k, v in state["per_stage"].items()}


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_metrics(device: torch.device) -> dict[str, float]:
    out = {"mem/rss_mib": round(rss_mib(), 1), "mem/peak_rss_mib": round(peak_rss_mib(), 1)}
    if device.type == "cuda":
        out["mem/cuda_alloc_mib"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
        out["mem/cuda_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class Stopwatch:
    """Wall time of the run so far, carried across resumes."""

    def __init__(self, offset: float = 0.0):
        self.offset = offset
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return self.offset + time.monotonic() - self.started
