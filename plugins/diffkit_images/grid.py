"""Samples as images: a PNG grid to look at and an ``.npz`` of the values to compute with.

File names (:func:`output_paths`): ``--out samples.png`` (or ``samples.npz``, ``samples.nc``,
``samples``) writes ``samples.png`` and ``samples.npz`` side by side; ``--out dir/`` (an
existing folder, or a path ending in ``/``) writes ``dir/samples.png`` and ``dir/samples.npz``.
Both are written atomically (a reader sees the old file or the new one).

The ``.npz`` holds

- ``x``: float32 ``(N, C, H, W)``, the de-normalised samples, *not* clamped;
- ``pixels``: uint8 ``(N, H, W, C)``, what the PNG shows (clamped to the display range);
- ``labels`` (int64 ``(N,)``) and ``class_names``, for class-conditional samples;
- ``channels`` (the channel names) and ``attrs`` (a JSON string: the layout's attributes, e.g.
  the value ``range``, and the sampling settings such as sampler, nfe, seed, guidance).

The PNG grid has one row per class (the class name written on its left) for class-conditional
samples, else a near-square grid.  Each sample is upscaled by an integer factor with
nearest-neighbour interpolation (``scale``, default ``max(1, 64 // max(H, W))``: 8x8 digits
become 64x64 cells), on a white background with ``pad`` pixels between cells.  Values map
to pixels linearly from the layout's display range (the ``range`` of ``normalize="range"``,
the training data's per-channel min..max for ``"standard"``) and are clamped only here.
1-, 3- and 4-channel samples are grayscale, RGB and RGBA images; other channel counts are
shown as grayscale channels side by side.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from diffkit._io import atomic_write
from diffkit.layout import Layout

#: suffixes replaced by ``.png`` / ``.npz`` in an output path
SUFFIXES = (".png", ".npz", ".nc", ".jpg", ".jpeg")


def output_paths(path) -> tuple[Path, Path]:
    """``(png, npz)`` for an output path; see the module docstring."""
    s = os.fspath(path)
    p = Path(s)
    if p.is_dir() or s.endswith(("/", os.sep)):
        return p / "samples.png", p / "samples.npz"
    stem = p.with_suffix("") if p.suffix.lower() in SUFFIXES else p
    return stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".npz")


def display_range(layout: Layout, x: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(lo, hi)`` that map to pixel values 0 and 255 (from the layout's attrs;
    the samples' own min..max for a layout without them)."""
    C = layout.num_channels
    a = layout.attrs
    if "display_min" in a and "display_max" in a:
        lo, hi = np.asarray(a["display_min"], np.float64), np.asarray(a["display_max"], np.float64)
    elif x is not None:
        lo = x.min(axis=(0, 2, 3)).astype(np.float64)
        hi = x.max(axis=(0, 2, 3)).astype(np.float64)
    else:
        raise ValueError("the layout has no display range (attrs display_min/display_max); pass the samples")
    lo, hi = np.broadcast_to(lo, (C,)).copy(), np.broadcast_to(hi, (C,)).copy()
    hi = np.where(hi > lo, hi, lo + 1.0)
    return lo, hi


def to_pixels(x: np.ndarray, layout: Layout) -> np.ndarray:
    """De-normalised samples ``(N, C, H, W)`` as uint8 pixels ``(N, H, W, C)``: linear from the
    display range, clamped to it, rounded."""
    lo, hi = display_range(layout, x)
    v = (x.astype(np.float64) - lo[:, None, None]) / (hi - lo)[:, None, None]
    return np.rint(np.clip(v, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def _cells(pixels: np.ndarray) -> np.ndarray:
    """``(N, H, W, C)`` pixels as displayable cells: C in (1, 3, 4) as is, else channels side by side."""
    if pixels.shape[-1] in (1, 3, 4):
        return pixels
    n, h, w, c = pixels.shape
    return pixels.transpose(0, 1, 3, 2).reshape(n, h, c * w, 1)


def default_scale(h: int, w: int) -> int:
    return max(1, 64 // max(h, w))


def make_grid(pixels: np.ndarray, labels=None, row_names=None, *, scale: int | None = None, pad: int = 2):
    """Arrange uint8 samples ``(N, H, W, C)`` in a grid; returns ``(image, positions, scale)``.

    With ``labels``, row ``r`` holds the samples of the ``r``-th smallest label present, in
    their order, and ``row_names(label)`` is written left of it; otherwise the grid has
    ``ceil(sqrt(N))`` columns.  ``positions[i]`` is the ``(left, top)`` pixel of sample ``i``'s
    cell, which holds the sample upscaled ``scale`` times by pixel repetition.
    """
    from PIL import Image, ImageDraw, ImageFont

    cells = _cells(np.asarray(pixels, dtype=np.uint8))
    n, h, w, c = cells.shape
    s = default_scale(pixels.shape[1], pixels.shape[2]) if scale is None else int(scale)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} samples; give one label per sample")
        keys = sorted(set(labels.tolist()))
        rows = [np.flatnonzero(labels == k) for k in keys]
    else:
        keys = []
        cols = max(1, math.ceil(math.sqrt(n)))
        rows = [np.arange(i, min(i + cols, n)) for i in range(0, n, cols)] or [np.arange(0)]
    ncols = max(1, max(len(r) for r in rows))
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    texts = [str(row_names(k) if row_names else k) for k in keys]
    boxes = [probe.textbbox((0, 0), t, font=font) for t in texts]
    margin = (max(b[2] for b in boxes) + 2 * pad + 2) if texts else 0
    ch, cw = h * s, w * s
    H, W = pad + len(rows) * (ch + pad), margin + pad + ncols * (cw + pad)
    canvas = np.full((H, W, c), 255, dtype=np.uint8)
    pos = [None] * n
    for r, idx in enumerate(rows):
        for j, i in enumerate(idx):
            left, top = margin + pad + j * (cw + pad), pad + r * (ch + pad)
            canvas[top:top + ch, left:left + cw] = np.repeat(np.repeat(cells[i], s, axis=0), s, axis=1)
            pos[int(i)] = (left, top)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[c]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode=mode)
    if texts:
        draw = ImageDraw.Draw(img)
        ink = {1: 0, 3: (0, 0, 0), 4: (0, 0, 0, 255)}[c]
        for r, (t, b) in enumerate(zip(texts, boxes)):
            top = pad + r * (ch + pad) + (ch - (b[3] - b[1])) // 2 - b[1]
            draw.text((pad, top), t, fill=ink, font=font)
    return img, pos, s


def class_label_name(layout: Layout):
    """``label -> text`` for the rows of a class-conditional grid: ``"k"``, or ``"k: name"``."""
    names = layout.attrs.get("class_names")

    def name(k: int) -> str:
        if names is not None and 0 <= k < len(names) and str(names[k]) != str(k):
            return f"{k}: {names[k]}"
        return str(k)
    return name


def write_samples(x: torch.Tensor, layout: Layout, path, *, attrs: dict | None = None,
                  labels: torch.Tensor | None = None, scale: int | None = None) -> Path:
    """Write de-normalised samples ``(N, C, H, W)`` as ``<stem>.png`` and ``<stem>.npz``; returns the PNG path."""
    png, npz = output_paths(path)
    xs = torch.as_tensor(x).detach().float().cpu().numpy()
    pix = to_pixels(xs, layout)
    lab = None
    if labels is not None:
        lab = torch.as_tensor(labels).detach().cpu().numpy().astype(np.int64).reshape(-1)
        if len(lab) != len(xs):
            raise ValueError(f"{len(lab)} labels for {len(xs)} samples; give one label per sample")
    img, _, _ = make_grid(pix, lab, class_label_name(layout) if lab is not None else None, scale=scale)
    meta = {**{k: v for k, v in layout.attrs.items()}, **(attrs or {})}
    arrays = {"x": xs.astype(np.float32), "pixels": pix, "channels": np.asarray(layout.channels, dtype=str),
              "attrs": np.asarray(json.dumps(meta, default=str))}
    if lab is not None:
        arrays["labels"] = lab
        if layout.attrs.get("class_names") is not None:
            arrays["class_names"] = np.asarray([str(c) for c in layout.attrs["class_names"]], dtype=str)
    atomic_write(npz, lambda f: np.savez(f, **arrays), binary=True)
    atomic_write(png, lambda f: img.save(f, format="PNG"), binary=True)
    return png
