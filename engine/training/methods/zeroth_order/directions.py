"""Where a zeroth-order update's directions come from: a direction source hands the update the sampler
of each iteration (`samplers.py`), and what the premise check and the end of an iteration read of it.

- `RunDirections`: a run's. It builds each iteration's sampler from the recipe: isotropic or block for
  `mezo` (and for zopro's zeroth-order iteration 0, which has no mu yet), and for `zopro` from iteration 1
  on the paper's informed directions or the gradient subspace, with mu and v read from the run's adapter
  history. It keeps what outlives an iteration: the reference norms (|mu_k| of the first informed
  iteration, the fixed length of z with `z_norm = "reference"`), the first-order iteration's gradient
  snapshots and the subspace basis built from them once.
- `FixedDirections`: one sampler for every iteration, no mu, no history (a benchmark, a test).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch

from engine.training.adapter_history import AdapterHistory
from engine.training.adapter_keys import neutral_key
from engine.training.methods.zeroth_order.samplers import (
    BlockSampler,
    DirectionSampler,
    GradientSnapshots,
    IsotropicSampler,
    SubspaceSampler,
    ZoproSampler,
    layer_blocks,
)

if TYPE_CHECKING:
    from engine.training.methods.context import MethodContext


class DirectionSource(Protocol):
    """The sampler of each iteration, and what the update's diagnostics read of it."""

    # mu of the iteration whose sampler was built last (the premise check reads it), or None
    momentum: dict[str, torch.Tensor] | None

    def sampler_for(self, iteration: int) -> tuple[DirectionSampler, bool]:
        """The iteration's sampler, and whether it was built by this call (the first update of the
        iteration in this process)."""
        ...

    @property
    def reference_norm(self) -> float | None:
        """The fixed length of z (|mu| of the first informed iteration over all tensors), or None."""
        ...

    def policy_change(self, iteration: int) -> float:
        """|policy now - policy at the end of iteration - 1| over all tensors."""
        ...

    @property
    def snapshot_count(self) -> int | None:
        """How many first-order gradients the subspace basis will be built from; None: no subspace."""
        ...

    def add_gradient(self, gradient: dict[str, torch.Tensor]) -> None:
        """A first-order iteration's raw gradient, for the subspace basis."""
        ...

    def renew_subspace(self) -> None:
        """A (refresh) first-order iteration starts: its gradients make the next basis."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class FixedDirections:
    """One sampler for every iteration: no mu, no v, no reference norm (a benchmark or a test)."""

    momentum = None
    reference_norm = None
    snapshot_count = None

    def __init__(self, sampler: DirectionSampler):
        self.sampler = sampler

    def add_gradient(self, gradient: dict[str, torch.Tensor]) -> None:
        pass

    def renew_subspace(self) -> None:
        pass

    def sampler_for(self, iteration: int) -> tuple[DirectionSampler, bool]:  # noqa: ARG002
        return self.sampler, False

    def policy_change(self, iteration: int) -> float:
        raise RuntimeError("fixed directions have no adapter history to measure the policy's change by")

    def state_dict(self) -> dict[str, Any]:
        return {"reference_norms": None, "snapshots": None, "basis": None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class RunDirections:
    """A run's directions, iteration by iteration (see the module docstring)."""

    def __init__(
        self,
        method: str,
        config: Any,
        params: dict[str, torch.Tensor],
        history: AdapterHistory | None,
        device: torch.device,
    ):
        self.method, self.config, self.params = method, config, params
        self.history_or_none = history
        self.device = device
        self.snapshots = (
            GradientSnapshots(config.subspace_snapshots) if config.sampler == "subspace" else None
        )
        self.sampler: DirectionSampler = IsotropicSampler()
        self.sampler_iteration: int | None = None
        self.reference_norms: dict[str, float] | None = None  # |mu_k| of the first informed iteration
        self.basis: torch.Tensor | None = None  # the subspace's orthonormal basis, once built
        self.momentum: dict[str, torch.Tensor] | None = None  # mu of the current informed iteration

    @classmethod
    def for_run(cls, context: MethodContext, method: str) -> RunDirections:
        """The directions of `method` (mezo or zopro) in the run `context` describes."""
        models = context.models
        history = context.adapter_history
        return cls(
            method,
            getattr(context.recipe, method),
            models.adapter_parameters("policy"),
            history,
            models.device,
        )

    @property
    def informed(self) -> bool:
        """Whether mu and v inform the directions from iteration 1 on (zopro)."""
        return self.method == "zopro"

    # -- the gradient subspace of a first-order iteration ------------------------------------------------
    def add_gradient(self, gradient: dict[str, torch.Tensor]) -> None:
        """Snapshot one raw first-order gradient for the subspace basis."""
        self.snapshots.add(gradient, self.params)

    def renew_subspace(self) -> None:
        """A (refresh) first-order iteration starts: its gradients make the next basis."""
        if self.snapshots is not None:
            self.snapshots.clear()
            self.basis = None

    @property
    def snapshot_count(self) -> int | None:
        return len(self.snapshots) if self.snapshots is not None else None

    # -- the sampler of an iteration ---------------------------------------------------------------------
    @property
    def reference_norm(self) -> float | None:
        if self.reference_norms is None:
            return None
        return math.sqrt(sum(x * x for x in self.reference_norms.values()))

    def sampler_for(self, iteration: int) -> tuple[DirectionSampler, bool]:
        if self.sampler_iteration == iteration:
            return self.sampler, False
        kind = self.config.sampler
        mu = v = None
        if self.informed and iteration > 0:
            mu, v = self.momentum_and_reward_change(iteration)
            if self.reference_norms is None:  # the first informed iteration fixes the scale
                self.reference_norms = {n: float(torch.linalg.vector_norm(t)) for n, t in mu.items()}
        self.momentum = mu  # this iteration's mu, read once from the history (the premise check uses it)
        fixed = self.reference_norms is not None and self.config.z_norm == "reference"
        norm = self.reference_norm
        if kind == "block":
            sampler: DirectionSampler = BlockSampler(layer_blocks(list(self.params)), norm if fixed else None)
        elif kind == "zopro" and mu is not None:
            sampler = ZoproSampler(
                mu, v, decay=self.config.decay_start, reference_norms=self.reference_norms if fixed else None
            )
        elif kind == "subspace" and mu is not None:
            shapes = {n: p.shape for n, p in self.params.items()}
            weighted = self.config.subspace_weighting == "gradients"
            if self.basis is None:  # built once from the snapshots, which are then let go
                self.basis = self.snapshots.subspace_basis(self.config.subspace_rank, weighted)
                self.snapshots.clear()
            sampler = SubspaceSampler(self.basis, shapes, norm, mu=mu, v=v, weighted=weighted)
        else:  # mezo, zopro's zeroth-order warm-up iteration 0 (no mu yet), or isotropic by choice
            total = sum(p.numel() for p in self.params.values())
            sampler = IsotropicSampler(norm / math.sqrt(total) if fixed else 1.0)
        self.sampler, self.sampler_iteration = sampler, iteration
        return sampler, True

    def momentum_and_reward_change(
        self, iteration: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """mu = the policy's whole change over the previous iteration (for iteration 1: policy - sft);
        v = the reward adapter's change in the previous iteration's refinement. Both from the run's
        adapter history (the adapters at the iteration boundaries), keyed like the policy parameters."""
        mu = self.history.change("policy", since=iteration - 2, until=iteration - 1)
        v = self.history.change("reward", since=iteration - 2, until=iteration - 1)
        to_param = self._saved_keys(mu)
        if set(mu) != set(v):
            raise ValueError("policy and reward adapters do not pair up key by key")
        return (
            {to_param[k]: mu[k].to(self.device) for k in to_param},
            {to_param[k]: v[k].to(self.device) for k in to_param},
        )

    def policy_change(self, iteration: int) -> float:
        start = self.history.at("policy", iteration - 1)
        to_param = self._saved_keys(start)
        return math.sqrt(
            sum(
                float(((self.params[name].detach().cpu() - start[key].float()) ** 2).sum())
                for key, name in to_param.items()
            )
        )

    @property
    def history(self) -> AdapterHistory:
        if self.history_or_none is None:
            raise RuntimeError(f"{self.method} needs the run's adapter history and the context has none")
        return self.history_or_none

    def _saved_keys(self, saved: dict[str, torch.Tensor]) -> dict[str, str]:
        """{saved adapter key: parameter name} for the policy parameters."""
        to_param = {neutral_key(name, "policy"): name for name in self.params}
        missing = sorted(set(to_param) - set(saved))
        if missing:
            raise ValueError(
                f"policy and reward adapters do not pair up key by key (first unmatched: {missing[:3]})"
            )
        return to_param

    # -- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "reference_norms": self.reference_norms,
            "snapshots": self.snapshots.state_dict() if self.snapshots is not None else None,
            "basis": self.basis.cpu() if self.basis is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reference_norms = state.get("reference_norms")
        if self.snapshots is not None and state.get("snapshots"):
            self.snapshots.load_state_dict(state["snapshots"], self.device)
        basis = state.get("basis")
        self.basis = basis.to(self.device) if basis is not None else None
        self.sampler_iteration = None  # rebuilt from the adapter history on the next update
