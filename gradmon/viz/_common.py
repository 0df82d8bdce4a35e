"""What the gradmon.viz plots share: a new figure (matplotlib is imported there, on the
first plot), saving it as a PNG, log10 for a log axis."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from gradmon.errors import GradmonError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "gradmon.viz needs matplotlib, which is not installed: pip install 'gradmon[viz]'"
        ) from exc
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def save_png(fig: Figure, out_png: str | os.PathLike[str]) -> Path:
    out = Path(out_png)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    except OSError as exc:
        raise GradmonError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def log10_or_nan(value: float) -> float:
    """log10 of a positive finite value; NaN (not drawn) otherwise."""
    return math.log10(value) if value > 0 and math.isfinite(value) else math.nan
