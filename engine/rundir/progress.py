"""How far along a run is: steps per second and the time left (the one ETA that `zopro ls/status`, the live
progress line and the TUI show)."""

from __future__ import annotations


def steps_per_second(steps: float, seconds: float) -> float | None:
    """The rate of `steps` done in `seconds`, or None before there is one."""
    return steps / seconds if steps > 0 and seconds > 0 else None


def eta_seconds(total_steps: int | None, global_step: int, rate: float | None) -> float | None:
    """Seconds until `total_steps` at `rate` steps per second from `global_step`; None without a rate or a total."""
    if not total_steps or not rate or rate <= 0:
        return None
    return max(0.0, (total_steps - global_step) / rate)
