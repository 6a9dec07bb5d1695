"""Activation checkpointing of a preference model's decoder layers for first-order passes, and handing freed
heap pages back to the OS after big layers (see `set_activation_checkpointing`)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from engine.training.telemetry import release_free_memory

CHECKPOINTING_MODES = ("auto", "on", "off")
CHECKPOINTING_AUTO_BYTES = 256 * 2**20
RELEASE_LAYER_BYTES = 32 * 2**20


def set_activation_checkpointing(pm: Any, mode: str) -> None:  # a models.PreferenceModel
    """Under autograd, each decoder layer keeps only its input and recomputes its inside during the backward
    (activation checkpointing): the kept activations drop from every layer's to one layer's at a time, for
    one more forward of the body per backward. "on": always; "off": never; "auto": on for a pass whose kept
    activations would exceed CHECKPOINTING_AUTO_BYTES, estimated from its tokens and the config as
    (10 x hidden + 4 x mlp) values per token and layer (what a Llama layer keeps for its backward: the
    MLP's four intermediate tensors and about ten of hidden size).

    After a layer whose temporaries exceed RELEASE_LAYER_BYTES (a checkpointed one also around its
    backward), the heap's freed pages go back to the OS (malloc_trim): glibc otherwise keeps each layer's
    freed temporaries resident (builtin:base10m, 64 x 56 tokens: 36 MiB live after a checkpointed forward,
    600 MiB resident), and the process's peak would not fall with the live tensors. Decoding steps (a few
    tokens a call) stay below it and are unchanged."""
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(
            f"model.gradient_checkpointing = {mode!r}; accepted: {', '.join(CHECKPOINTING_MODES)}"
        )
    from transformers.modeling_layers import GradientCheckpointingLayer  # transformers' checkpointable layers

    config = pm.model.get_base_model().config
    hidden = config.hidden_size
    per_token_layer = 10 * hidden + 4 * (getattr(config, "intermediate_size", None) or 4 * hidden)
    layers = [m for m in pm.decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    pm.kept_bytes_per_token = per_token_layer * len(layers) * pm.base_dtype.itemsize
    for layer in layers:
        layer.forward = _layer_forward.__get__(layer)
        layer.zopro_checkpoint_bytes = {"on": 0, "off": None}.get(mode, CHECKPOINTING_AUTO_BYTES)
        layer.zopro_kept_per_token = per_token_layer
        layer.zopro_layers = len(layers)


def _layer_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """A decoder layer's forward, checkpointed under autograd when the pass is big enough (see above)."""
    forward = type(self).forward
    layer_bytes = hidden_states.shape[:-1].numel() * self.zopro_kept_per_token * hidden_states.element_size()
    limit = self.zopro_checkpoint_bytes
    if torch.is_grad_enabled() and limit is not None and layer_bytes * self.zopro_layers > limit:
        output = checkpoint(forward, self, hidden_states, *args, use_reentrant=False, **kwargs)
        tensor = output[0] if isinstance(output, tuple) else output
        for boundary in (tensor, hidden_states):  # the output's gradient arrives before the layer's
            if boundary.requires_grad:  # backward, the input's after it
                boundary.register_hook(_release_in_backward)
    else:
        output = forward(self, hidden_states, *args, **kwargs)
        if torch.is_grad_enabled():
            return output  # its activations are kept: nothing to hand back
    if layer_bytes > RELEASE_LAYER_BYTES:
        release_free_memory()
    return output


def _release_in_backward(grad: torch.Tensor) -> None:
    release_free_memory()
