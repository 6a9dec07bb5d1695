"""The layer an adapter key belongs to, and the network's order of layers: how the interplay metrics group
tensors per layer."""

from __future__ import annotations

import re

_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_of(key: str) -> str:
    """The layer a tensor belongs to: "layer.<i>" for a transformer block, "lm_head", "embed" or "other"."""
    if match := _LAYER_INDEX.search(f".{key}"):
        return f"layer.{int(match.group(1))}"
    segments = key.split(".")
    if "lm_head" in segments or "embed_out" in segments:
        return "lm_head"
    if any("embed" in segment or segment in ("wte", "wpe") for segment in segments):
        return "embed"
    return "other"


def layer_sort_key(layer: str) -> tuple[int, int]:
    """Order layers as in the network: embed, layer.0, layer.1, ..., lm_head, other."""
    if layer.startswith("layer."):
        return (1, int(layer.split(".", 1)[1]))
    return ({"embed": 0, "lm_head": 2}.get(layer, 3), 0)
