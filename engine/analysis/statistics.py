"""Exact statistics of two update vectors (cosine, angle, Pearson, distance correlation) and their streamed
form: moments of paired slices merged with Chan's formula, equal up to float64 rounding to the direct ones."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

Vector = Tensor | np.ndarray | Sequence[float]

# A variance this small relative to the mean square is float64 rounding of a constant vector.
_NEGLIGIBLE_VARIANCE = 1e-24


# -- exact primitives ----------------------------------------------------------------------------------------


def flat64(values: Vector, device: torch.device | None = None) -> Tensor:
    if isinstance(values, Tensor):
        flat = values.detach().reshape(-1).to(torch.float64)
    else:
        flat = torch.as_tensor(np.asarray(values, dtype=np.float64).reshape(-1))
    return flat if device is None else flat.to(device)


def _same_size(first: Tensor, second: Tensor) -> None:
    if first.numel() != second.numel():
        raise ValueError(f"the two vectors have different sizes ({first.numel()} and {second.numel()})")


def _clamp_unit(value: float) -> float:
    return value if math.isnan(value) else max(-1.0, min(1.0, value))


def cosine_from_sums(dot: float, squared_norm_first: float, squared_norm_second: float) -> float:
    """cos = <a, b> / (|a| |b|) from the streamed sums; 0.0 when either norm is 0 (never NaN for zero norms)."""
    if squared_norm_first <= 0.0 or squared_norm_second <= 0.0:
        return 0.0
    return _clamp_unit(dot / (math.sqrt(squared_norm_first) * math.sqrt(squared_norm_second)))


def angle_from_cosine(cos: float) -> float:
    """The angle in degrees, in [0, 180], of a cosine (clamped to [-1, 1] against rounding)."""
    return math.degrees(math.acos(_clamp_unit(cos)))


def cosine(first: Vector, second: Vector) -> float:
    """Cosine of two same-size tensors, accumulated in float64; 0.0 when either norm is 0."""
    first64 = flat64(first)
    second64 = flat64(second, first64.device)
    _same_size(first64, second64)
    return cosine_from_sums(float(first64 @ second64), float(first64 @ first64), float(second64 @ second64))


def angle_deg(first: Vector, second: Vector) -> float:
    """Angle between two tensors in degrees, acos of `cosine`: 90.0 when either norm is 0 (a zero vector is
    treated as orthogonal to everything), 0 for parallel and 180 for anti-parallel vectors."""
    return angle_from_cosine(cosine(first, second))


def pearson(first: Vector, second: Vector) -> float:
    """Pearson correlation of the coordinates of two same-size tensors (float64); 0.0 when a variance is 0."""
    first64 = flat64(first)
    second64 = flat64(second, first64.device)
    _same_size(first64, second64)
    return PairMoments.from_rows(moments(first64, second64).cpu().numpy()[None, :]).pearson


def distance_correlation(first: Vector, second: Vector) -> float:
    """Distance correlation of two 1-D samples (Szekely, Rizzo and Bakirov 2007), the V-statistic, O(n^2).

    dCor is 0 for independent samples (in the limit) and 1 for y = a x + b; unlike Pearson it also sees
    non-linear dependence. 0.0 when either sample is constant or has fewer than 2 points."""
    first64 = flat64(first).cpu().numpy()
    second64 = flat64(second).cpu().numpy()
    if first64.size != second64.size:
        raise ValueError(f"the two samples have different sizes ({first64.size} and {second64.size})")
    if first64.size < 2:
        return 0.0

    def centred_distances(sample: np.ndarray) -> np.ndarray:
        distances = np.abs(sample[:, None] - sample[None, :])
        return (
            distances - distances.mean(axis=0, keepdims=True) - distances.mean(axis=1, keepdims=True)
        ) + distances.mean()

    first_centred = centred_distances(first64)
    second_centred = centred_distances(second64)
    covariance_sq = float((first_centred * second_centred).mean())
    variance_first_sq = float((first_centred * first_centred).mean())
    variance_second_sq = float((second_centred * second_centred).mean())
    if variance_first_sq <= 0.0 or variance_second_sq <= 0.0:
        return 0.0
    return math.sqrt(max(covariance_sq, 0.0) / math.sqrt(variance_first_sq * variance_second_sq))


# -- streamed sums ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairMoments:
    """Sums over the coordinates of two vectors, enough for their norms, cosine and Pearson correlation.

    Streamed, they travel as rows of a float64 table with one column per field, in the order declared here
    (`MOMENT_FIELDS`): `moments` writes a row, `from_rows` merges rows by these names."""

    count: float
    sum_first: float
    sum_second: float
    m2_first: float  # sum of (a - mean a)^2
    m2_second: float
    comoment: float  # sum of (a - mean a)(b - mean b)
    dot: float
    sq_first: float
    sq_second: float

    @classmethod
    def from_rows(cls, rows: np.ndarray) -> PairMoments:
        """Merge per-tensor rows (Chan, Golub and LeVeque's pairwise update): the moments of the concatenation."""
        column = {name: rows[:, i] for i, name in enumerate(MOMENT_FIELDS)}
        counts = column["count"]
        total = float(counts.sum())
        if total == 0.0:
            return cls(**dict.fromkeys(MOMENT_FIELDS, 0.0))
        safe_counts = np.where(counts > 0, counts, 1.0)
        mean_first, mean_second = column["sum_first"].sum() / total, column["sum_second"].sum() / total
        offset_first = column["sum_first"] / safe_counts - mean_first
        offset_second = column["sum_second"] / safe_counts - mean_second
        return cls(
            count=total,
            sum_first=float(column["sum_first"].sum()),
            sum_second=float(column["sum_second"].sum()),
            m2_first=float((column["m2_first"] + counts * offset_first**2).sum()),
            m2_second=float((column["m2_second"] + counts * offset_second**2).sum()),
            comoment=float((column["comoment"] + counts * offset_first * offset_second).sum()),
            dot=float(column["dot"].sum()),
            sq_first=float(column["sq_first"].sum()),
            sq_second=float(column["sq_second"].sum()),
        )

    @property
    def norm_first(self) -> float:
        return math.sqrt(self.sq_first)

    @property
    def norm_second(self) -> float:
        return math.sqrt(self.sq_second)

    @property
    def cosine(self) -> float:
        return cosine_from_sums(self.dot, self.sq_first, self.sq_second)

    @property
    def pearson(self) -> float:
        if (
            self.m2_first <= _NEGLIGIBLE_VARIANCE * self.sq_first
            or self.m2_second <= _NEGLIGIBLE_VARIANCE * self.sq_second
        ):
            return 0.0
        return _clamp_unit(self.comoment / (math.sqrt(self.m2_first) * math.sqrt(self.m2_second)))


MOMENT_FIELDS: tuple[str, ...] = tuple(field.name for field in fields(PairMoments))  # the columns of a row


def moments(first: Tensor, second: Tensor) -> Tensor:
    """Per-tensor float64 moments of two flat float64 vectors: one row, a column per PairMoments field."""
    count = first.numel()
    if count == 0:
        return first.new_zeros(len(MOMENT_FIELDS))
    sum_first, sum_second = first.sum(), second.sum()
    centred_first = first - sum_first / count
    centred_second = second - sum_second / count
    row = {
        "count": first.new_tensor(float(count)),
        "sum_first": sum_first,
        "sum_second": sum_second,
        "m2_first": centred_first @ centred_first,
        "m2_second": centred_second @ centred_second,
        "comoment": centred_first @ centred_second,
        "dot": first @ second,
        "sq_first": first @ first,
        "sq_second": second @ second,
    }
    return torch.stack([row[name] for name in MOMENT_FIELDS])


DOT_FIELDS: tuple[str, ...] = ("dot", "sq_first", "sq_second")  # the columns of a `dots` row


def dots(first: Tensor, second: Tensor) -> Tensor:
    """<a, b>, |a|^2 and |b|^2 of two flat float64 vectors: one row, the columns DOT_FIELDS."""
    return torch.stack([first @ second, first @ first, second @ second])
