"""Zeroth-order policy updates, `mezo` and `zopro` (docs/method.md section 3), in one package:

- `update.py`: `ZerothOrderUpdate`, one SPSA update per rollout on the `rloo` surrogate (zopro's
  first-order iterations through `RLOOUpdate`), its schedule, guards and diagnostics;
- `directions.py`: where each iteration's directions come from, handed to the update (`RunDirections`
  for a run, from the adapter history; `FixedDirections` for a benchmark);
- `samplers.py`: the direction samplers (isotropic, zopro, subspace, block), regenerated from a seed;
- `spsa.py`: the SPSA core (perturb, two losses, restore, step) with seed-replayed directions;
- `premise.py`: the check of ZOPrO's premise at the start of a zeroth-order iteration.
"""

from engine.training.methods.zeroth_order.directions import DirectionSource, FixedDirections, RunDirections
from engine.training.methods.zeroth_order.update import ZerothOrderUpdate

__all__ = ["DirectionSource", "FixedDirections", "RunDirections", "ZerothOrderUpdate"]
