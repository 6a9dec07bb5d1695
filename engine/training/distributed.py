"""Data parallelism over prompts on PyTorch's own stack: processes started by torchrun, one
torch.distributed process group (NCCL on GPUs, gloo on CPU), collectives with a timeout.

What is communicated, and why that is enough (architecture.md, "scaling out"):
- the model, the adapters and every random generator are replicated: all ranks build the same LoRA
  initialisation from the recipe's seed (and rank 0's is broadcast once to be sure), and every draw comes
  from a generator seeded by (seed, position in the run), the same on every rank;
- each rank samples and scores its contiguous share of an update's prompts (`shard`), on the noise the
  whole batch would get, so a sequence does not depend on how many ranks there are;
- first-order methods all-reduce the adapters' gradients once per backward, weighted by how many items
  (sequences, tokens, pairs) each rank's loss averaged over (`sync_gradients`): the mean over the global
  batch, exactly as one process would compute it. DDP's module wrapper is not used: one peft model holds
  four adapters, only one of which trains at a time, and DDP would need `find_unused_parameters` for
  the rest; the explicit all-reduce after backward is the same one bucket DDP sends;
- zeroth-order methods all-reduce only the scalar g of each direction (`mean_scalar`): q floats per update;
- metrics are averaged over ranks, and the few lists the loop keeps (rollouts, evaluation answers) are
  gathered so every rank holds the same state and rank 0 writes it.

A lost rank turns every waiting collective into `RankLost` (one sentence) within the timeout instead
of a hang. One process (no torchrun) is `Distributed()`: every method is then a no-op that costs nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from engine.errors import TrainingFailed

DEFAULT_TIMEOUT_S = 600.0  # ZOPRO_DIST_TIMEOUT_S: how long a collective waits for a rank that does not come


class RankLost(TrainingFailed):
    """A collective failed or timed out: another rank died, or the network between them did."""


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Distributed:
    """This process's place among the ranks of one run, and the collectives the loop uses."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, backend: str | None = None):
        self.rank, self.world_size, self.local_rank, self.backend = rank, world_size, local_rank, backend
        self.bytes = {"gradients": 0, "scalars": 0, "diagnostics": 0, "objects": 0}  # payload sent, by kind

    @classmethod
    def from_environment(cls, device: str = "auto") -> Distributed:
        """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT);
        a single process without them. NCCL when the run's device is a GPU, gloo otherwise."""
        if not launched_by_torchrun():
            return cls()
        import torch.distributed as dist

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        gpu = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
        backend = "nccl" if gpu else "gloo"
        if gpu:
            torch.cuda.set_device(local)
        timeout = float(os.environ.get("ZOPRO_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        return cls(rank, world, local, backend)

    # -- who am I --------------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, resolved: torch.device) -> torch.device:
        """This rank's device: its own GPU (LOCAL_RANK) when the run is on CUDA."""
        if self.enabled and resolved.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return resolved

    @property
    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                if dist.is_initialized():
                    dist.destroy_process_group()

    def sent_bytes(self) -> int:
        """Gradient and scalar payload this rank has all-reduced so far (what training needs; the
        pickled bookkeeping, metrics and gathered answers are counted apart in `bytes["objects"]`)."""
        return self.bytes["gradients"] + self.bytes["scalars"]

    # -- splitting the work ----------------------------------------------------------------------------------
    def shard(self, n: int) -> slice:
        """This rank's contiguous share of n items: sizes differ by at most one, rank order kept."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. building a model into a shared cache), the others after it."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    # -- collectives -----------------------------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RankLost:
            raise
        except (RuntimeError, ValueError, ConnectionError) as error:  # DistBackendError is a RuntimeError
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            raise RankLost(
                f"rank {self.rank} of {self.world_size} lost the other ranks during {what} ({first}): a process "
                "died or the network failed; the last checkpoint can be resumed with `zopro run --resume`"
            ) from None

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            self._call("a barrier", dist.barrier)

    def _all_reduce(self, tensor: torch.Tensor, what: str, kind: str) -> torch.Tensor:
        import torch.distributed as dist

        self.bytes[kind] += tensor.numel() * tensor.element_size()
        self._call(what, dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_floats(self, values: Iterable[float], what: str = "a sum") -> list[float]:
        values = [float(v) for v in values]
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        return self._all_reduce(tensor, what, "scalars").tolist()

    def mean_scalar(self, value: float) -> float:
        """The mean of `value` over ranks (the zeroth-order g of one direction: one float64 each)."""
        if not self.enabled:
            return float(value)
        return self.sum_floats([value], "the zeroth-order estimate")[0] / self.world_size

    def sync_gradients(self, params: Iterable[torch.nn.Parameter], weight: float) -> float:
        """Replace each rank's gradients (of a loss averaged over `weight` local items) by the mean over
        all ranks' items: sum_r weight_r * grad_r / sum_r weight_r, in one all-reduce of one flat bucket.
        A rank with no items sends zeros. Returns the global weight (0: nobody had anything)."""
        params = list(params)
        if not self.enabled:
            return float(weight)
        grads = [
            p.grad.detach().float() if p.grad is not None else p.new_zeros(p.shape).float() for p in params
        ]
        flat = torch.cat(
            [g.reshape(-1) * float(weight) for g in grads]
            + [torch.tensor([float(weight)], device=params[0].device if params else "cpu")]
        ).to(self._comm_device)
        self._all_reduce(flat, "the gradient all-reduce", "gradients")
        total = float(flat[-1])
        if total > 0:
            for p, mean in zip(params, _split_like(flat[:-1] / total, params), strict=True):
                if p.grad is None:
                    p.grad = mean
                else:
                    p.grad.copy_(mean)
        return total

    def mean_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The mean over ranks of same-shaped tensors (diagnostic gradients: counted apart from training's)."""
        if not self.enabled:
            return tensors
        names = sorted(tensors)
        flat = torch.cat([tensors[n].detach().double().reshape(-1) for n in names]).to(self._comm_device)
        self._all_reduce(flat, "a diagnostic all-reduce", "diagnostics")
        means = _split_like(flat / self.world_size, [tensors[n] for n in names])
        return dict(zip(names, means, strict=True))

    def gather(self, items: list[Any], what: str = "gathering results") -> list[Any]:
        """Every rank's list, concatenated in rank order, on every rank (picklable items)."""
        if not self.enabled:
            return list(items)
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        self.bytes["objects"] += _approx_bytes(items)
        self._call(what, dist.all_gather_object, out, list(items))
        return [x for part in out for x in part]

    def broadcast(self, value: Any, what: str = "a broadcast") -> Any:
        """Rank 0's `value` on every rank (picklable)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        if self.is_main:
            self.bytes["objects"] += _approx_bytes(value)
        self._call(what, dist.broadcast_object_list, box, src=0)
        return box[0]

    @staticmethod
    def mean_of(every: list[dict[str, Any]]) -> dict[str, Any]:
        """Ranks' metrics: numbers averaged over the ranks that report them, the rest as rank 0 has it."""
        out = dict(every[0])
        for metrics in every[1:]:
            out.update({k: v for k, v in metrics.items() if k not in out})
        for key, value in out.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values = [m[key] for m in every if isinstance(m.get(key), (int, float))]
                out[key] = sum(values) / len(values)
        return out

    def broadcast_parameters(self, params: Iterable[torch.Tensor]) -> None:
        """Rank 0's values of `params` on every rank (the start of a run, as DDP does)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        for p in params:
            data = p.data.to(self._comm_device)
            self._call("the initial parameter broadcast", dist.broadcast, data, src=0)
            if data.data_ptr() != p.data.data_ptr():
                p.data.copy_(data)


def _split_like(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """A flat bucket cut back into tensors shaped, typed and placed like `like`."""
    pieces = torch.split(flat, [t.numel() for t in like])
    return [piece.view_as(t).to(t.device, t.dtype) for piece, t in zip(pieces, like, strict=True)]


def _approx_bytes(value: Any) -> int:
    import pickle

    try:
        return len(pickle.dumps(value))
    except Exception:  # noqa: BLE001 - an estimate for the benchmark only
        return 0
