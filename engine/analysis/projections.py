"""Fixed random projections and coordinate sketches, regenerated from a seed on the CPU (never stored), so
the live tracker on any device and the offline report give the same numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from engine.seeds import MASK_63, digest64

# -- fixed random projections and sketches -----------------------------------------------------------------


def derived_seed(seed: int, purpose: str, key: str = "") -> int:
    """A 63-bit seed that is a pure function of (seed, purpose, key), stable across runs and machines."""
    return digest64(f"{seed}/{purpose}/{key}") & MASK_63


def gaussian_projection(key: str, numel: int, dims: int, seed: int) -> Tensor:
    """The fixed (numel, dims) float64 N(0, 1/dims) projection of one tensor, regenerated on the CPU from
    (seed, key) so no D x dims matrix is stored and every device gets the same one; E|x G|^2 = |x|^2."""
    generator = torch.Generator(device="cpu").manual_seed(derived_seed(seed, "trajectory", key))
    return torch.randn(numel, dims, generator=generator, dtype=torch.float64) / math.sqrt(dims)


def sketch_coordinates(total: int, sketch_size: int, seed: int) -> np.ndarray:
    """A fixed random subset of min(sketch_size, total) coordinates of the concatenated adapter (keys in
    sorted order), as sorted indices; chosen once from the seed."""
    rng = np.random.Generator(np.random.PCG64(derived_seed(seed, "sketch")))
    return np.sort(rng.choice(total, size=min(sketch_size, total), replace=False))


def split_coordinates(coordinates: np.ndarray, numels: Sequence[int]) -> list[Tensor]:
    offsets = np.cumsum([0, *numels])
    owners = np.searchsorted(offsets, coordinates, side="right") - 1
    return [torch.as_tensor(coordinates[owners == index] - offsets[index]) for index in range(len(numels))]
