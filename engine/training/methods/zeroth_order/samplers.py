"""Direction samplers for zeroth-order (SPSA) updates: one family behind one interface.

Every sampler regenerates the direction z of an integer seed, tensor by tensor in sorted-name order, so a
direction is never stored (seed replay) and every rank and a resumed run draw the same z. They differ in
where z lives and how long it is:

| name        | z                                                              | source                              |
|-------------|----------------------------------------------------------------|-------------------------------------|
| `isotropic` | N(0, I) on every tensor (|z| ~ sqrt(D))                        | MeZO, Malladi et al. 2023,          |
|             |                                                                | arXiv 2305.17333                    |
| `zopro`     | d mu_k + sqrt(1 - d^2) n_perp, n ~ N(0, I) made orthogonal to  | ZOPrO, Galatolo et al. 2025,        |
|             | v_k and rescaled to |mu_k| (as published) or to a fixed        | arXiv 2503.03460                    |
|             | reference norm (`zopro.z_norm = "reference"`)                  | (docs/method.md section 3)          |
| `subspace`  | R Q c / |c|, c ~ N(0, I_r), Q an orthonormal basis of the raw  | gradient-subspace ZO: P-GAP,        |
|             | policy gradients of a first-order iteration, R fixed           | arXiv 2510.18228; LOZO's low-rank   |
|             |                                                                | idea, arXiv 2410.07698; issue 10    |
| `block`     | N(0, I) on one block (one layer's adapter tensors, or one      | MeZO-BCD, arXiv 2501.19099          |
|             | other module), zero elsewhere; the block is drawn per direction|                                     |

Why more than MeZO: the estimate's cosine with the true gradient is about sqrt(q / D) for isotropic z
(0.01 for the 52k adapter values of the built-in model with q = 4); a block lowers D by the number of
blocks, the gradient subspace lowers it to r <= 16 directions that hold most of the next gradient.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor

SAMPLERS = ("isotropic", "zopro", "subspace", "block")


class DirectionSampler(Protocol):
    """Regenerates the direction z of a seed; `decay` is ZOPrO's d (0 for the others)."""

    name: str
    decay: float

    def check(self, params: Mapping[str, Tensor]) -> None:
        """Raise ValueError if no direction can be drawn for these parameters."""
        ...

    def replay(self, params: Mapping[str, Tensor], seed: int) -> Iterator[tuple[str, Tensor, Tensor]]:
        """(name, parameter, z_name) in sorted-name order; a tensor whose z is zero may be left out.
        z is float32, shaped like the parameter, on its device."""
        ...

    def references(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        """(mu_k, v_k) of tensor `name` for the diagnostics cos(z, mu) and cos(z, v), or (None, None)."""
        ...


def standard_normal(param: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32)


def seeded_generators(seed: int) -> dict[torch.device, torch.Generator]:
    """A lazily filled {device: generator seeded with `seed`}: one generator per device."""
    return _Generators(seed)


class _Generators(dict):
    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def __missing__(self, device: torch.device) -> torch.Generator:
        self[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self[device]


class TensorwiseSampler:
    """A sampler that draws each tensor's z from the shared per-device generator, in sorted-name order."""

    name = "tensorwise"
    decay = 0.0

    def check(self, params: Mapping[str, Tensor]) -> None:
        pass

    def direction(self, name: str, param: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def replay(self, params: Mapping[str, Tensor], seed: int) -> Iterator[tuple[str, Tensor, Tensor]]:
        generators = seeded_generators(seed)
        for name in sorted(params):
            param = params[name]
            yield name, param, self.direction(name, param, generators[param.device])

    def references(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        return None, None


class IsotropicSampler(TensorwiseSampler):
    """MeZO: z ~ N(0, I) for every tensor, times `scale` (1: as published; R / sqrt(D) gives |z| ~ R)."""

    name = "isotropic"

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def direction(self, name: str, param: Tensor, generator: torch.Generator) -> Tensor:
        z = standard_normal(param, generator)
        return z if self.scale == 1.0 else z.mul_(self.scale)


def fill_zero_norms(norms: Mapping[str, float], numels: Mapping[str, int]) -> dict[str, float]:
    """Replace each zero norm by the norm a tensor of that size has at the per-value RMS of the others:
    sqrt(numel_k * sum_j |x_j|^2 / sum_j numel_j) over the tensors j with a non-zero norm (1 per value
    when every norm is zero, the scale of an isotropic draw)."""
    moving = [name for name, norm in norms.items() if norm > 0]
    per_value = (
        math.sqrt(sum(norms[n] ** 2 for n in moving) / sum(numels[n] for n in moving)) if moving else 1.0
    )
    return {name: norm if norm > 0 else math.sqrt(numels[name]) * per_value for name, norm in norms.items()}


class ZoproSampler(TensorwiseSampler):
    """ZOPrO's informed directions (docs/method.md section 3). Per tensor k:

        n ~ N(0, I)
        n_perp = n - <v_hat_k, n> v_hat_k               (skipped when |v_k| = 0)
        n_perp <- n_perp * L_k / |n_perp|               (L_k: |mu_k| as published, or a fixed reference)
        z_k = d mu_k (L_k / |mu_k|) + sqrt(1 - d^2) n_perp

    With `reference_norms=None` L_k = |mu_k|, the paper's sampler: z is as long as the last change, so when
    mu is itself a zeroth-order change the steps shrink geometrically from iteration to iteration. With
    reference norms (the |mu_k| of the first informed iteration, kept by the method) the length is fixed
    and mu only gives the direction.

    Fallbacks, so that z is never zero or NaN (0 <= d < 1 is enforced):
    - |v_k| = 0, or no room orthogonal to v_k (one element, or n parallel to v_k): n_perp = n.
    - L_k = 0 (this tensor did not move): L_k is the norm that a tensor of its size has at the per-value
      RMS of the other tensors' L (`fill_zero_norms`), so its noise has the scale of the rest; the mu term
      is zero.

    mu and v are kept by reference (no copy when they are float32 already): put them on the parameters'
    device, or every draw copies them there.
    """

    name = "zopro"

    def __init__(
        self,
        mu: Mapping[str, Tensor],
        v: Mapping[str, Tensor],
        decay: float,
        reference_norms: Mapping[str, float] | None = None,
    ) -> None:
        if set(mu) != set(v):
            raise ValueError(f"mu and v must have the same keys; differ on {sorted(set(mu) ^ set(v))}")
        self.mu = {name: tensor.detach().to(torch.float32) for name, tensor in mu.items()}
        self.v = {name: tensor.detach().to(torch.float32) for name, tensor in v.items()}
        self.mu_norm: dict[str, float] = {}
        self.v_norm: dict[str, float] = {}
        for name in self.mu:
            if self.mu[name].shape != self.v[name].shape:
                raise ValueError(
                    f"mu and v of tensor {name!r} differ in shape: "
                    f"{tuple(self.mu[name].shape)} vs {tuple(self.v[name].shape)}"
                )
            self.mu_norm[name] = float(torch.linalg.vector_norm(self.mu[name]))
            self.v_norm[name] = float(torch.linalg.vector_norm(self.v[name]))
            if not (math.isfinite(self.mu_norm[name]) and math.isfinite(self.v_norm[name])):
                raise ValueError(f"mu or v of tensor {name!r} is not finite")
        lengths = dict(self.mu_norm) if reference_norms is None else dict(reference_norms)
        if set(lengths) != set(self.mu) or not all(math.isfinite(x) and x >= 0 for x in lengths.values()):
            raise ValueError("reference norms must be finite, >= 0 and keyed like mu")
        self.length = fill_zero_norms(lengths, {name: t.numel() for name, t in self.mu.items()})
        self.decay = decay

    @property
    def decay(self) -> float:
        return self._decay

    @decay.setter
    def decay(self, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"ZOPrO decay d must be in [0, 1), got {value}")
        self._decay = float(value)

    def check(self, params: Mapping[str, Tensor]) -> None:
        for name, param in params.items():
            if name not in self.mu:
                raise ValueError(
                    f"ZoproSampler has no mu/v for tensor {name!r}; key them like the parameters"
                )
            if self.mu[name].shape != param.shape:
                raise ValueError(
                    f"mu/v of tensor {name!r} have shape {tuple(self.mu[name].shape)}, "
                    f"the parameter {tuple(param.shape)}"
                )

    def noise(self, name: str, param: Tensor, generator: torch.Generator) -> Tensor:
        """n_perp of tensor `name` before mixing: orthogonal to v_k, norm L_k (see the fallbacks)."""
        n = standard_normal(param, generator)
        n_perp = n
        if self.v_norm[name] > 0:
            v_hat = self.v[name].to(param.device) / self.v_norm[name]
            # n_perp = n - <v_hat, n> v_hat
            n_perp = n - torch.dot(v_hat.reshape(-1), n.reshape(-1)) * v_hat
            # nothing left orthogonal to v: keep n (decided on the device, no host sync)
            n_perp = torch.where(n_perp.norm() > 1e-5 * n.norm(), n_perp, n)
        # rescale n_perp to L_k
        return n_perp * (self.length[name] / torch.linalg.vector_norm(n_perp))

    def direction(self, name: str, param: Tensor, generator: torch.Generator) -> Tensor:
        d = self.decay
        # z_k = d mu_k (L_k / |mu_k|) + sqrt(1 - d^2) n_perp
        z = math.sqrt(1.0 - d * d) * self.noise(name, param, generator)
        if self.mu_norm[name] > 0:
            z.add_(self.mu[name].to(param.device), alpha=d * self.length[name] / self.mu_norm[name])
        return z

    def references(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        return self.mu[name], self.v[name]


class GradientSnapshots:
    """Up to `capacity` raw policy gradients of a first-order iteration, each flattened (sorted names) in
    float32 on the parameters' device: capacity x D x 4 bytes (15 x 52k values = 3 MiB for the built-in
    model; 16 x 45M = 2.9 GB for rank-64 LoRA on a 1B model: lower `zopro.subspace_snapshots` there).
    When full, the oldest snapshot gives way: the basis follows the latest gradients."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"need room for at least one gradient snapshot, got {capacity}")
        self.capacity = capacity
        self.rows: list[Tensor] = []

    def add(self, grads: Mapping[str, Tensor | None], params: Mapping[str, Tensor]) -> None:
        """Snapshot one gradient ({name: grad}, None for a tensor without one: zeros)."""
        parts = []
        for name in sorted(params):
            grad = grads.get(name)
            parts.append(
                torch.zeros(params[name].numel(), device=params[name].device)
                if grad is None
                else grad.detach().reshape(-1).float()
            )
        self.rows.append(torch.cat(parts))
        del self.rows[: -self.capacity]

    def clear(self) -> None:
        self.rows = []

    def __len__(self) -> int:
        return len(self.rows)

    def basis(self, rank: int = 0) -> Tensor:
        """An orthonormal basis (D, r) of the snapshots' span (QR; columns of a rank-deficient span
        dropped); with `rank` k > 0 fewer than the snapshots their k leading left singular vectors instead,
        the k directions that hold most of the snapshots' energy. Deterministic for the same snapshots on
        the same device."""
        if 0 < rank < len(self.rows):  # a rank that covers every snapshot keeps the QR basis below
            u, _ = self._leading(rank)
            return u.contiguous()
        q, r = torch.linalg.qr(self._stacked(), mode="reduced")
        diagonal = r.diagonal().abs()
        keep = diagonal > 1e-6 * float(diagonal.max())
        if not bool(keep.any()):
            raise ValueError("the gradient snapshots are all zero: no subspace to sample from")
        return q[:, keep].contiguous()

    def weighted_basis(self, rank: int = 0) -> Tensor:
        """Orthogonal columns U_j s_j / s_max of the snapshots' SVD (columns with s_j <= 1e-6 s_max
        dropped; with `rank` k > 0 only the k leading ones): with c ~ N(0, I) the direction B c is
        distributed as the snapshots' own spread, N(0, G G') up to scale (guided ES), instead of evenly over
        the span. Deterministic on one device."""
        u, s = self._leading(rank)
        return (u * (s / s[0])).contiguous()

    def subspace_basis(self, rank: int = 0, weighted: bool = False) -> Tensor:
        """The basis the subspace sampler draws from: `weighted_basis` or `basis`, of `rank` columns at most
        (`zopro.subspace_weighting`, `zopro.subspace_rank`)."""
        return self.weighted_basis(rank) if weighted else self.basis(rank)

    def _stacked(self) -> Tensor:
        """The snapshots as the columns of one (D, n) matrix."""
        if not self.rows:
            raise ValueError(
                "no gradient snapshots: the subspace sampler needs a first-order iteration first"
            )
        return torch.stack(self.rows, dim=1)

    def _leading(self, rank: int) -> tuple[Tensor, Tensor]:
        """Left singular vectors and values of the snapshots, in descending order: those above 1e-6 s_max,
        the first `rank` of them at most (0: all)."""
        u, s, _ = torch.linalg.svd(self._stacked(), full_matrices=False)
        if not bool((s > 0).any()):
            raise ValueError("the gradient snapshots are all zero: no subspace to sample from")
        keep = s > 1e-6 * float(s.max())
        if rank:
            keep &= torch.arange(len(s), device=s.device) < rank
        return u[:, keep], s[keep]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "rows": [row.cpu() for row in self.rows]}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.capacity = int(state["capacity"])
        self.rows = [row.to(device) for row in state["rows"]]


class SubspaceSampler:
    """z = R Q c / |c| with c ~ N(0, I_r): a direction of norm R inside the span of `basis` (D, r)
    (orthonormal columns, rows in sorted-name order of the parameters). One r-vector per seed.
    `weighted`: the columns are orthogonal with lengths s_j (`GradientSnapshots.weighted_basis`), and
    z = R B c / |B c|, |B c| = sqrt(sum_j s_j^2 c_j^2): directions follow the gradients' spread."""

    name = "subspace"
    decay = 0.0

    def __init__(
        self,
        basis: Tensor,
        shapes: Mapping[str, torch.Size],
        norm: float,
        mu: Mapping[str, Tensor] | None = None,
        v: Mapping[str, Tensor] | None = None,
        weighted: bool = False,
    ):
        total = sum(math.prod(shape) for shape in shapes.values())
        if basis.dim() != 2 or basis.shape[0] != total:
            raise ValueError(f"the basis has shape {tuple(basis.shape)}; expected ({total}, r)")
        if not (math.isfinite(norm) and norm > 0):
            raise ValueError(f"the subspace sampler's norm must be a positive number, got {norm}")
        self.basis, self.norm = basis, float(norm)
        self.shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
        self.mu, self.v = dict(mu or {}), dict(v or {})
        self.lengths = torch.linalg.vector_norm(basis, dim=0) if weighted else None

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def check(self, params: Mapping[str, Tensor]) -> None:
        if {n: p.shape for n, p in params.items()} != self.shapes:
            raise ValueError("the subspace basis was built for other parameters (names or shapes differ)")

    def coefficients(self, seed: int) -> Tensor:
        """The r coordinates of the direction of `seed` in the basis: z = Q c, |z| = R."""
        generator = torch.Generator(device=self.basis.device).manual_seed(seed)
        c = torch.randn(self.rank, generator=generator, device=self.basis.device, dtype=torch.float32)
        if self.lengths is None:
            return c * (self.norm / torch.linalg.vector_norm(c))  # |Q c| = |c| for orthonormal Q
        return c * (self.norm / torch.linalg.vector_norm(c * self.lengths))  # orthogonal columns

    def slices(self, params: Mapping[str, Tensor]) -> Iterator[tuple[str, Tensor, Tensor]]:
        """(name, param, Q_k): the rows of the basis that belong to each tensor, in sorted-name order."""
        offset = 0
        for name in sorted(params):
            numel = params[name].numel()
            yield name, params[name], self.basis[offset : offset + numel]
            offset += numel

    def replay(self, params: Mapping[str, Tensor], seed: int) -> Iterator[tuple[str, Tensor, Tensor]]:
        c = self.coefficients(seed)
        for name, param, rows in self.slices(params):
            yield name, param, (rows @ c).view(param.shape).to(param.device)

    def references(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        return self.mu.get(name), self.v.get(name)


_LAYER = re.compile(r"layers\.(\d+)\.")


def layer_blocks(names: Sequence[str]) -> list[list[str]]:
    """Blocks for block-coordinate descent: one per transformer layer (`layers.<i>.`), one per other
    module (the output head's adapter, ...), each its tensors in sorted order; blocks in sorted order."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        match = _LAYER.search(name)
        key = f"layer {int(match.group(1)):06d}" if match else name.split(".lora_")[0]
        groups.setdefault(key, []).append(name)
    return [groups[key] for key in sorted(groups)]


class BlockSampler:
    """MeZO-BCD: z ~ N(0, I) on one block of tensors (`layer_blocks`), zero on the others. The block is
    drawn uniformly from the direction's seed, so with q = 1 each update perturbs one block. With
    `norm`, z is scaled by norm / sqrt(block size), so that |z| ~ norm whichever block is drawn."""

    name = "block"
    decay = 0.0

    def __init__(self, blocks: Sequence[Sequence[str]], norm: float | None = None):
        if not blocks or not all(blocks):
            raise ValueError("the block sampler needs at least one non-empty block")
        self.blocks = [sorted(block) for block in blocks]
        self.norm = norm

    def check(self, params: Mapping[str, Tensor]) -> None:
        covered = [name for block in self.blocks for name in block]
        if sorted(covered) != sorted(params):
            raise ValueError("the blocks must cover each parameter exactly once")

    def block_of(self, seed: int) -> int:
        generator = torch.Generator().manual_seed(seed)
        return int(torch.randint(len(self.blocks), (1,), generator=generator))

    def replay(self, params: Mapping[str, Tensor], seed: int) -> Iterator[tuple[str, Tensor, Tensor]]:
        generators = seeded_generators(seed)
        block = self.blocks[self.block_of(seed)]
        scale = 1.0
        if self.norm is not None:
            scale = self.norm / math.sqrt(sum(params[name].numel() for name in block))
        for name in block:
            param = params[name]
            z = standard_normal(param, generators[param.device])
            yield name, param, z if scale == 1.0 else z.mul_(scale)

    def references(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        return None, None
