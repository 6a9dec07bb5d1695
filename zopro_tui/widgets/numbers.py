"""Numbers written into a chart's few cells: tick labels and legend values that fit whole, x labels by axis."""

from __future__ import annotations

import math


def fmt_number(value: float, width: int = 7) -> str:
    """A short tick label that fits `width` whole: 0.123, -5.9e-5, 12.3k, 4.5M (never a cut exponent)."""
    if value is None or not math.isfinite(value):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1e6:
        text = f"{value / 1e6:.3g}M"
    elif magnitude >= 1e4:
        text = f"{value / 1e3:.3g}k"
    elif magnitude >= 100 or value == int(value):
        text = f"{value:.0f}"
    elif magnitude >= 1e-3 or magnitude == 0:
        digits = max(1, min(4, width - 3))
        text = f"{value:.{digits}g}"
        while len(text) > width and digits > 1:  # fewer digits before an exponent: -0.0117, not -1.2e-2
            digits -= 1
            text = f"{value:.{digits}g}"
    else:
        text = _short_exponent(value, width)
    return text if len(text) <= width else _short_exponent(value, width)


def _short_exponent(value: float, width: int) -> str:
    """`-5.9e-5`: the exponent without its sign's `+` and its leading zeros, fewer digits until it fits."""
    for digits in (1, 0):
        mantissa, exponent = f"{value:.{digits}e}".split("e")
        text = f"{mantissa}e{int(exponent)}"
        if len(text) <= width:
            return text
    return text


def fmt_x(value: float, kind: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if kind == "time":
        seconds = int(value)
        hours, rest = divmod(seconds, 3600)
        minutes, secs = divmod(rest, 60)
        return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
    if abs(value) >= 10:  # steps and forward passes are counts
        value = round(value)
    return fmt_number(value, 8)
