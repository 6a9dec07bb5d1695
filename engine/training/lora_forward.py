"""How a preference model's LoRA layers compute. `install` gives every peft LoRA Linear one forward that
takes peft's path except where the same function costs less:

- merged (inside `PreferenceModel.merged_lora`: no autograd, a float32 base): x (W + s B A)^T with a
  temporary merged weight instead of xW^T + s (xA^T)B^T, at a plain layer's cost once a pass has many more
  tokens than the rank;
- under autograd, with one plain adapter active and one dtype throughout: xW^T + (xA^T)(sB)^T, the adapter's
  product added in place into the base product by one addmm_, its scale applied to B (rank x out values)
  instead of to the layer's output. peft's path makes more passes over the output (B's product, its
  scaling, the sum) and one in the backward (the scaling's gradient); the reward model's step of the
  embedded default (builtin:tiny, 64 x 24 tokens, two threads) took 59-64 ms against 70-78 ms.

Anything else (no adapter or several, adapters disabled or merged into the weights by peft, a LoRA
variant such as DoRA, a bias on B, fan-in-fan-out weights, mixed dtypes such as a bf16 base under float32
adapters, autocast, extra arguments) goes to peft's own forward."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def install(model: nn.Module) -> None:
    """Give each peft LoRA Linear of `model` the forward of this module (idempotent)."""
    from peft.tuners.lora import Linear as LoraLinear

    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.forward = _lora_forward.__get__(module)
            module.zopro_merging = None  # True/False inside merged_lora: keep the merged weight or not
            module.zopro_row_probe = None  # inside row_probes.probing: each row's own perturbation


def _single_adapter(layer: Any, args: tuple, kwargs: dict) -> str | None:
    """The one plain LoRA adapter this call applies, or None where peft's path must run."""
    active = layer.active_adapters
    name = active[0] if len(active) == 1 else None
    if (
        name is None
        or args
        or kwargs
        or layer.disable_adapters
        or layer.merged
        or name not in layer.lora_A
        or name in layer.lora_variant
        or layer.lora_bias.get(name, False)
        or layer.fan_in_fan_out
    ):
        return None
    return name


def _lora_forward(self: Any, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _single_adapter(self, args, kwargs)
    grad = torch.is_grad_enabled()
    if self.zopro_row_probe is not None and not grad:
        if name is None:  # peft's path would silently leave this layer's perturbation out
            raise ValueError(
                "zeroth-order row probes need one plain LoRA adapter on every layer (no DoRA, no bias on B, "
                "no fan-in-fan-out weights); use zopro.probes = 'batch' with this adapter"
            )
        return _row_probed(self, x, name, *self.zopro_row_probe)
    if name is not None and self.zopro_merging is not None and not grad:
        return _merged(self, x, name)
    if name is None or not grad or torch.is_autocast_enabled(x.device.type):
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    if not x.dtype == lora_a.dtype == base.weight.dtype:
        return type(self).forward(self, x, *args, **kwargs)
    rows = x.reshape(-1, x.shape[-1])
    # a new tensor that no backward reads: adding into it in place is safe
    out = nn.functional.linear(rows, base.weight, base.bias)
    low = nn.functional.linear(self.lora_dropout[name](rows), lora_a)
    out.addmm_(low, (lora_b * self.scaling[name]).t())
    return out.view(*x.shape[:-1], out.shape[-1])


def _merged(self: Any, x: torch.Tensor, name: str) -> torch.Tensor:
    """x (W + s B A)^T; with merged_lora(keep=True) the merged weight is made once and kept."""
    base = self.get_base_layer()
    weight = vars(self).get("zopro_merged_weight")
    if weight is None:
        weight = torch.addmm(
            base.weight, self.lora_B[name].weight, self.lora_A[name].weight, alpha=self.scaling[name]
        )
        if self.zopro_merging:
            vars(self)["zopro_merged_weight"] = weight
    return nn.functional.linear(x, weight, base.bias)


def _row_probed(self: Any, x: torch.Tensor, name: str, basis_a, basis_b, coefficients) -> torch.Tensor:
    """Row i of `x` through W + s (B + dB_i)(A + dA_i): dA_i, dB_i = the rows `basis_a`, `basis_b` of the
    subspace basis times row i's coefficients (zeroth-order row probes, docs/method.md section 3.2)."""
    rows = coefficients.shape[0]
    if x.dim() != 3 or x.shape[0] != rows:
        raise ValueError(f"row probes need ({rows}, tokens, features) inputs, got {tuple(x.shape)}")
    base = self.get_base_layer()
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    delta_a = (coefficients @ basis_a.T).view(rows, *lora_a.shape).to(lora_a.dtype)
    delta_b = (coefficients @ basis_b.T).view(rows, *lora_b.shape).to(lora_b.dtype)
    out = nn.functional.linear(x, base.weight, base.bias)
    x = x.to(lora_a.dtype)  # a bf16 base under float32 adapters: the adapter's part in float32, as peft
    low = nn.functional.linear(x, lora_a) + torch.bmm(x, delta_a.transpose(1, 2))
    lora = nn.functional.linear(low, lora_b) + torch.bmm(low, delta_b.transpose(1, 2))
    return out.add_(lora.to(out.dtype), alpha=self.scaling[name])
