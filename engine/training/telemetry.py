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
        return {
            "forward_passes": self.forward_passes,
            "backward_passes": self.backward_passes,
            "tokens": self.tokens,
            "stage": self.stage,
            "per_stage": self.per_stage,
        }

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


def _vm_hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc); without it RSS keeps old peaks and hides new ones."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PhasePeak:
    """Peak memory of one phase (a policy update): on CUDA the peak allocated bytes, on CPU the growth of
    peak RSS over the RSS when the phase began (Linux resets the high-water mark through clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0.0
        self.resettable = _vm_hwm_mib() is not None

    def __enter__(self) -> PhasePeak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_free_memory()  # so the RSS we start from is what is really in use
            if self.resettable:
                try:
                    with open("/proc/self/clear_refs", "w") as refs:
                        refs.write("5")
                except OSError:
                    self.resettable = False
            self.baseline = rss_mib()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            hwm = _vm_hwm_mib() if self.resettable else None
            self.peak = hwm if hwm is not None else peak_rss_mib()

    @property
    def growth_mib(self) -> float:
        """Peak over the phase's starting point (CPU: RSS growth; CUDA: allocated growth)."""
        return max(0.0, self.peak - self.baseline)
