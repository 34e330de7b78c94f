"""Figures without pyplot: a matplotlib ``Figure`` on the Agg canvas, written atomically.

Domain plugins draw their plots with these two helpers, so that diffkit never touches pyplot's
global state (a user's open figures and chosen backend stay as they are) and a reader of the
PNG sees the old file or the new one, never a part.  matplotlib is imported only when called.
"""
from __future__ import annotations

from pathlib import Path

from ._io import atomic_write


def new_figure(width: float, height: float):
    """A ``matplotlib.figure.Figure`` of ``width x height`` inches, constrained layout, Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path, dpi: int = 120, *, tight: bool = True) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, PNG by default) atomically: a temporary
    file in the same folder, fsync, then ``os.replace``; an existing file keeps its mode."""
    fmt = Path(path).suffix[1:].lower() or "png"
    kw = {"bbox_inches": "tight"} if tight else {}
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi, **kw), binary=True)
