"""What every module of the weather plugin shares: its error class and the formatting of
attribute values, levels and coordinate values for checkpoints and messages."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from diffkit.errors import DiffkitError


class WeatherDataError(DiffkitError, ValueError):
    """Gridded files cannot be used as asked (missing variable, grids that differ, gaps, ...)."""



def _plain(v):
    """Attribute values as checkpoint-safe plain data (str, int, float, lists of them)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()] if v.ndim else _plain(v.item())
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (int, float, str)):
        return v
    return str(v)


def _attrs(a: Mapping) -> dict:
    return {str(k): _plain(v) for k, v in a.items()}


def _fmt_level(v) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() else f"{v:g}"


def _vals(a, n: int = 3) -> str:
    a = np.asarray(a).ravel()
    if a.size <= 2 * n:
        return "[" + ", ".join(f"{x:g}" if np.issubdtype(a.dtype, np.number) else str(x) for x in a) + "]"
    head = ", ".join(f"{x:g}" for x in a[:n])
    tail = ", ".join(f"{x:g}" for x in a[-n:])
    return f"[{head}, ..., {tail}] ({a.size} values)"



#: the name of the weather adapter (``data.adapter = "weather"``), which its layouts record in ``attrs["adapter"]``
ADAPTER = "weather"
