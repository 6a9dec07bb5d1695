"""Seeds as pure functions of the run seed and a position in the run: every random draw of a run comes
from a generator seeded here, never from the global RNG, so resume, several ranks and tests reproduce."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

MASK_63 = (1 << 63) - 1


def digest64(text: str) -> int:
    """The 64-bit blake2b digest of `text` as an integer (little-endian): well mixed, stable everywhere."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def seeded(seed: int, *where: Any) -> int:
    """A 63-bit seed that is a pure function of the run seed and a position in the run."""
    return digest64(":".join(str(x) for x in (seed, *where))) >> 1


def generator(seed: int, *where: Any) -> torch.Generator:
    """A CPU generator seeded by `seeded(seed, *where)`."""
    gen = torch.Generator()
    gen.manual_seed(seeded(seed, *where))
    return gen
