"""Splitting a batch into even chunks of rows, and how many rows a pass without autograd runs at once
(docs/architecture.md, "Memory"; the first-order side is `accumulation.py`)."""

from __future__ import annotations

from typing import Any

INFERENCE_CHUNK_BYTES = 32 * 2**20  # one layer's temporaries in a pass without autograd (inference_rows)
ALL_ROWS = 1 << 62  # rows per chunk when a batch stays whole


def row_chunks(rows: int, most: int) -> list[slice]:
    """`rows` split into the fewest even chunks of at most `most` rows (at least one chunk)."""
    count = max(1, -(-rows // max(1, most)))
    size = max(1, -(-rows // count))
    return [slice(start, min(rows, start + size)) for start in range(0, max(rows, 1), size)]


def inference_rows(pm: Any, width: int) -> int:  # a models.PreferenceModel
    """Rows of `width` tokens per forward of a pass without autograd (rollout scoring, the zeroth-order
    losses): as many as keep one layer's temporaries under `pm.inference_chunk_bytes`, estimated per token as
    three MLP-wide and eight hidden-wide tensors plus a row of attention weights per head. A pass without
    autograd keeps no activations, so its peak is one layer's temporaries of the rows it runs at once; a
    chunk of rows at a time bounds it whatever the batch (builtin:base10m, 64 x 56 tokens: 73 MiB at once).
    The result is the same to float32 rounding. On a GPU the batch stays whole (splitting it costs a GPU
    throughput, and its allocator reuses freed blocks)."""
    if pm.device.type != "cpu":
        return ALL_ROWS
    config = pm.model.get_base_model().config
    hidden = config.hidden_size
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", 1)
    per_token = (3 * mlp + 8 * hidden) * pm.base_dtype.itemsize + heads * width * 4
    return max(1, pm.inference_chunk_bytes // max(1, per_token * width))
