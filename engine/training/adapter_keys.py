"""Pairing the policy and reward adapters key by key (peft's saved names, without the adapter name): what
ZOPrO, the interplay metrics and the offline interplay report need of adapter names. The layer a key
belongs to is `engine.analysis.layers`."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import Tensor


def neutral_key(name: str, adapter: str) -> str | None:
    """The parameter name without its adapter segment (`...lora_A.policy.weight` -> `...lora_A.weight`, the
    key peft writes in adapter_model.safetensors), or None when `name` is not a LoRA tensor of `adapter`."""
    key, found = re.subn(rf"(\.lora_[^.]+)\.{re.escape(adapter)}(?=\.|$)", r"\1", name)
    return key if found else None


def match_adapter_tensors(
    policy_by_key: Mapping[str, Tensor],
    reward_by_key: Mapping[str, Tensor],
    policy_source: str = "the policy adapter",
    reward_source: str = "the reward adapter",
) -> list[tuple[str, Tensor, Tensor]]:
    """Pair two adapters' tensors by key, sorted by key; ValueError naming the first unpaired keys or shapes."""
    only_policy = sorted(set(policy_by_key) - set(reward_by_key))
    only_reward = sorted(set(reward_by_key) - set(policy_by_key))
    common = sorted(set(policy_by_key) & set(reward_by_key))
    mismatched = [key for key in common if policy_by_key[key].shape != reward_by_key[key].shape]
    problems = []
    if only_policy:
        problems.append(f"{len(only_policy)} only in {policy_source} (e.g. {', '.join(only_policy[:3])})")
    if only_reward:
        problems.append(f"{len(only_reward)} only in {reward_source} (e.g. {', '.join(only_reward[:3])})")
    if mismatched:
        examples = ", ".join(
            f"{key}: {tuple(policy_by_key[key].shape)} vs {tuple(reward_by_key[key].shape)}"
            for key in mismatched[:3]
        )
        problems.append(f"{len(mismatched)} paired with different shapes (e.g. {examples})")
    if problems:
        raise ValueError(
            f"The tensors of {policy_source} and {reward_source} do not pair up key by key: "
            f"{'; '.join(problems)}. Both adapters must target the same modules with the same LoRA rank."
        )
    if not common:
        raise ValueError(f"{policy_source} and {reward_source} have no LoRA tensors to pair.")
    return [(key, policy_by_key[key], reward_by_key[key]) for key in common]


def pair_adapter_tensors(
    named_tensors: Mapping[str, Tensor], policy: str = "policy", reward: str = "reward"
) -> list[tuple[str, Tensor, Tensor]]:
    """Pair the LoRA tensors of two adapters of one peft model by neutral key: (key, policy, reward), sorted.

    Tensors that belong to neither adapter's LoRA (base weights, other adapters, a `modules_to_save` score
    head) are ignored. ValueError when a LoRA tensor has no counterpart or the shapes differ."""
    if policy == reward:
        raise ValueError(f"the policy and reward adapters must have different names (both are {policy!r})")
    policy_by_key: dict[str, Tensor] = {}
    reward_by_key: dict[str, Tensor] = {}
    for name, tensor in named_tensors.items():
        if (key := neutral_key(name, policy)) is not None:
            policy_by_key[key] = tensor
        elif (key := neutral_key(name, reward)) is not None:
            reward_by_key[key] = tensor
    if not policy_by_key and not reward_by_key:
        examples = ", ".join(list(named_tensors)[:3]) or "none"
        raise ValueError(
            f"No LoRA tensors of adapters {policy!r} and {reward!r} among {len(named_tensors)} tensors "
            f"(e.g. {examples}); expected names like ...q_proj.lora_A.{policy}.weight."
        )
    return match_adapter_tensors(policy_by_key, reward_by_key, f"adapter {policy!r}", f"adapter {reward!r}")


def adapter_views(pairs: Sequence[tuple[str, Tensor, Tensor]]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split pairs into the {key: policy tensor} and {key: reward tensor} dicts the tracker reads."""
    return {key: policy for key, policy, _ in pairs}, {key: reward for key, _, reward in pairs}
