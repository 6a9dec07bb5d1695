"""The adapter history that ZOPrO reads its mu and v from: CPU copies of the policy and the reward adapter
at the last two iteration boundaries (iteration -1: after the reward model), keyed like the checkpoint's
adapter files (peft's saved names). A run records it in memory; a resumed run rebuilds it once from the
checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.errors import TrainingFailed
from engine.rundir.checkpoints import adapter_file, iteration_checkpoint_name
from engine.rundir.safe_io import plain_tree

ADAPTERS = ("policy", "reward")


class AdapterHistory:
    """{iteration: {"policy": {key: tensor}, "reward": {key: tensor}}} for the last `keep` boundaries."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.boundaries: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def record(
        self, iteration: int, policy: Mapping[str, torch.Tensor], reward: Mapping[str, torch.Tensor]
    ) -> None:
        """Keep CPU copies of both adapters as they are at the end of `iteration`; forget older ones."""
        self.boundaries[iteration] = {
            name: {key: tensor.detach().to("cpu", copy=True) for key, tensor in tensors.items()}
            for name, tensors in (("policy", policy), ("reward", reward))
        }
        for old in sorted(self.boundaries)[: -self.keep]:
            del self.boundaries[old]

    def read_checkpoint(self, iteration: int, checkpoint: Path) -> None:
        """Rebuild the copies of `iteration` from its checkpoint folder (on resume); a boundary whose files
        cannot be read is left out (`at` says so if a method asks for it)."""
        try:
            plain_tree(checkpoint)  # a link would load another file, a FIFO would hang the read
            saved = {name: load_file(str(adapter_file(checkpoint, name))) for name in ADAPTERS}
        except Exception:  # noqa: BLE001 - a missing or damaged file: this boundary is not known
            return
        self.record(iteration, saved["policy"], saved["reward"])

    def at(self, adapter: str, iteration: int) -> dict[str, torch.Tensor]:
        """One adapter's tensors at the end of `iteration`; TrainingFailed when that boundary is not held
        (its checkpoint could not be read on resume)."""
        if iteration not in self.boundaries:
            name = iteration_checkpoint_name(iteration)
            raise TrainingFailed(
                f"zopro needs the adapters of checkpoint {name} (the end of iteration {iteration + 1}), which "
                "could not be read on resume: restore that checkpoint folder, or start a new run"
            )
        return self.boundaries[iteration][adapter]

    def change(self, adapter: str, *, since: int, until: int) -> dict[str, torch.Tensor]:
        """adapter(until) - adapter(since), in float32, by key."""
        after, before = self.at(adapter, until), self.at(adapter, since)
        return {key: after[key].float() - before[key].float() for key in after}

    def clear(self) -> None:
        self.boundaries.clear()
