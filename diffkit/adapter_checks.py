"""The adapter contract check, :func:`check_adapter` (re-exported by :mod:`diffkit.testing`):
layout, items, splits, decode and checkpoint round trip of a data adapter, usable with or without
pytest.  torch, numpy and xarray are imported lazily, inside the check."""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable


def _fail(msg: str) -> None:
    raise AssertionError(msg)


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)


# -- adapters ------------------------------------------------------------------------------
_ITEM_KEYS = ("x", "fields", "scalars", "label", "weight")


def _same(a: Any, b: Any) -> bool:
    """Equality that also compares tensors (and containers of them) by value."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _check_layout(layout, who: str):
    """The layout is self-consistent and survives a checkpoint; returns the layout read back."""
    import dataclasses
    import io

    import torch

    from .layout import Layout

    if not isinstance(layout, Layout):
        _fail(f"adapter {who}: .layout is a {type(layout).__name__}, not a diffkit.Layout")
    full = layout.sample_shape
    for what, names in (("channels", layout.channels), ("cond_channels", layout.cond_channels),
                        ("scalars", layout.scalars), ("spatial", layout.spatial), ("periodic", layout.periodic)):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            _fail(f"adapter {who}: layout.{what} names {dup} more than once")
        if any(not n for n in names):
            _fail(f"adapter {who}: layout.{what} holds an empty name")
    for ax in layout.periodic:
        if ax not in layout.spatial:
            _fail(f"adapter {who}: periodic axis {ax!r} is not one of the spatial axes {layout.spatial}")
    for ax, vals in layout.coords.items():
        if ax not in layout.spatial:
            _fail(f"adapter {who}: layout.coords has values for {ax!r}, which is not a spatial axis {layout.spatial}")
        n = layout.shape[layout.spatial.index(ax)]
        if len(vals) != n:
            _fail(f"adapter {who}: layout.coords[{ax!r}] has {len(vals)} values but axis {ax!r} has size {n}")
        c = torch.tensor(vals, dtype=torch.float64)
        if not bool(torch.isfinite(c).all()):
            _fail(f"adapter {who}: layout.coords[{ax!r}] holds NaN or inf")
        d = c[1:] - c[:-1]
        if n > 1 and not (bool((d > 0).all()) or bool((d < 0).all())):
            _fail(f"adapter {who}: layout.coords[{ax!r}] is not strictly monotonic")
        if ax in layout.periodic and n > 2 and not torch.allclose(d, d.mean().expand_as(d), rtol=1e-3, atol=0):
            _fail(f"adapter {who}: periodic axis {ax!r} has unevenly spaced coordinates; circular padding "
                  f"assumes a uniform grid that wraps around")
    for what in ("mean", "std", "weights"):
        v = getattr(layout, what)
        if v is None:
            continue
        if torch.broadcast_shapes(v.shape, full) != full:
            _fail(f"adapter {who}: layout.{what} of shape {tuple(v.shape)} broadcasts to "
                  f"{tuple(torch.broadcast_shapes(v.shape, full))}, not to the sample shape {full}")
        if not bool(torch.isfinite(v).all()):
            _fail(f"adapter {who}: layout.{what} holds NaN or inf")
    if layout.weights is not None and (bool((layout.weights < 0).any()) or not bool((layout.weights > 0).any())):
        _fail(f"adapter {who}: layout.weights (the per-element loss weights) must be >= 0 and not all 0")
    if (layout.mean is None) != (layout.std is None):
        _fail(f"adapter {who}: the layout sets only one of mean and std; give both (or neither)")

    # what a checkpoint does with it: to_dict, torch.save, torch.load(weights_only=True), from_dict
    buf = io.BytesIO()
    try:
        torch.save({"layout": layout.to_dict()}, buf)
        buf.seek(0)
        back = Layout.from_dict(torch.load(buf, weights_only=True)["layout"])
    except Exception as e:
        _fail(f"adapter {who}: the layout does not survive a checkpoint (to_dict, torch.save, "
              f"torch.load(weights_only=True), from_dict): {type(e).__name__}: {e}. layout.attrs may hold "
              f"only str, int, float, bool, None, lists, dicts and tensors (no numpy scalars or arrays)")
    for f in dataclasses.fields(Layout):
        if not _same(getattr(layout, f.name), getattr(back, f.name)):
            _fail(f"adapter {who}: layout.{f.name} changes through to_dict/from_dict (a checkpoint): "
                  f"{getattr(layout, f.name)!r:.200} became {getattr(back, f.name)!r:.200}")
    return back


def _check_item(item: Any, layout, who: str) -> None:
    import torch

    if not isinstance(item, dict):
        _fail(f"adapter {who}: {type(item).__name__} item; dataset items must be dicts with keys {_ITEM_KEYS}")
    unknown = sorted(set(item) - set(_ITEM_KEYS))
    if unknown:
        _fail(f"adapter {who}: item keys {unknown} are not part of the protocol (keys: {', '.join(_ITEM_KEYS)}); "
              f"the trainer would ignore them")
    shape = layout.sample_shape
    want = {"x": shape}
    if layout.cond_channels:
        want["fields"] = (len(layout.cond_channels), *layout.shape)
    if layout.scalars:
        want["scalars"] = (len(layout.scalars),)
    for key, why in (("fields", "layout.cond_channels"), ("scalars", "layout.scalars"), ("label", "layout.num_classes")):
        if key in item and key not in want and not (key == "label" and layout.num_classes):
            _fail(f"adapter {who}: items carry {key!r} but {why} declares none")
    for key, shp in want.items():
        v = item.get(key)
        if v is None:
            _fail(f"adapter {who}: items lack {key!r} (shape {shp}), which the layout declares")
        if not isinstance(v, torch.Tensor):
            _fail(f"adapter {who}: item[{key!r}] is a {type(v).__name__}, not a torch.Tensor")
        if not v.is_floating_point():
            _fail(f"adapter {who}: item[{key!r}] has dtype {v.dtype}; use a float tensor (float32)")
        if tuple(v.shape) != shp:
            _fail(f"adapter {who}: item[{key!r}] has shape {tuple(v.shape)}, but the layout says {shp}")
        if not bool(torch.isfinite(v).all()):
            _fail(f"adapter {who}: item[{key!r}] holds NaN or inf; fill missing values (e.g. with 0) and give "
                  f"them weight 0 in item['weight']")
    if layout.num_classes:
        lab = item.get("label")
        if not isinstance(lab, torch.Tensor) or lab.shape != () or lab.is_floating_point() or lab.dtype == torch.bool:
            _fail(f"adapter {who}: item['label'] must be a 0-d integer tensor (the layout has "
                  f"{layout.num_classes} classes), got {lab!r:.80}")
        if not 0 <= int(lab) < layout.num_classes:
            _fail(f"adapter {who}: item['label'] = {int(lab)} is outside [0, {layout.num_classes}) "
                  f"(label {layout.num_classes} is the null label of guidance, not a class)")
    w = item.get("weight")
    if w is not None:
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            _fail(f"adapter {who}: item['weight'] must be a float tensor")
        try:
            ok = torch.broadcast_shapes(w.shape, shape) == shape
        except RuntimeError:
            ok = False
        if not ok:
            _fail(f"adapter {who}: item['weight'] of shape {tuple(w.shape)} does not broadcast to x's shape {shape}")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            _fail(f"adapter {who}: item['weight'] must be finite and >= 0")


def _read_netcdf_back(path, layout):
    """Samples ``(N, C, *shape)`` from a netCDF file holding one variable per channel, dims
    ``(sample, *spatial)`` in any order (what :func:`diffkit.adapters.write_netcdf` writes)."""
    import numpy as np

    try:
        import xarray as xr

        ds = xr.open_dataset(path)
    except Exception as e:
        raise LookupError(f"it is not a netCDF file xarray can open ({type(e).__name__}: {e})") from None
    with ds:
        missing = [c for c in layout.channels if c not in ds.data_vars]
        if missing:
            raise LookupError(f"it has no variables named after the channels {missing[:4]} "
                              f"(variables: {', '.join(map(str, ds.data_vars)) or 'none'})")
        out = []
        for c in layout.channels:
            da = ds[c]
            if da.ndim != layout.ndim + 1 or not set(layout.spatial) <= set(da.dims):
                raise LookupError(f"variable {c!r} has dims {da.dims}, not (sample, {', '.join(layout.spatial)})")
            out.append(np.asarray(da.transpose(..., *layout.spatial).values, dtype=np.float64))
    return np.stack(out, axis=1)


def check_adapter(adapter: Any, *, read_back: Callable | None = None, decode_suffix: str = ".nc",
                  n_items: int = 8, rtol: float = 1e-5, atol: float = 1e-6, workdir=None, **options):
    """Check a data adapter against diffkit's adapter protocol; returns the adapter.

    ``adapter`` is an adapter class, built as ``adapter(**options)`` (as the trainer builds it from
    ``data.options``), or an instance (then give no options).  The check covers:

    - **the protocol**: ``.layout`` is a :class:`diffkit.Layout`; ``.dataset("train")`` and
      ``.dataset("val")`` are sized, indexable datasets (train not empty) and an unknown split
      raises; ``decode`` is a classmethod ``decode(x, layout, path, *, attrs=None)``;
    - **the layout**: unique channel, conditioning, scalar and axis names; periodic axes are
      spatial axes, and evenly spaced where they have coordinates; coordinates match the axis
      sizes, finite and monotonic; ``mean``, ``std`` and the area ``weights`` broadcast to the
      sample shape (not beyond), finite, weights >= 0; and the layout survives a checkpoint
      (``to_dict``, ``torch.save``, ``torch.load(weights_only=True)``, ``from_dict``) unchanged;
    - **the items** (up to ``n_items`` of each split): dicts with keys among ``x``, ``fields``,
      ``scalars``, ``label``, ``weight``; ``x`` of shape ``layout.sample_shape``; ``fields``,
      ``scalars`` and ``label`` present exactly when the layout declares them, with their shapes;
      float tensors (labels integer, in ``[0, num_classes)``), finite; weights broadcastable to
      ``x`` and >= 0; the same keys in every item; an item is a function of its index (read
      twice, equal: exact resume relies on it); items collate into a batch; and the training
      values look standardised (mean within 10, std within 0.01 .. 100);
    - **the round trip**: ``decode`` of the training items' ``x`` (with their ``labels``, if the
      layout has classes and decode takes that keyword), called on the class with the layout
      *read back from a checkpoint* (a checkpoint alone must be enough), writes a file
      whose values equal ``layout.denormalize(x)`` within ``rtol`` and ``atol`` (relative to the
      largest value), NaN allowed only where the item's weight is 0; ``x`` is left unchanged and
      no hidden temporary file is left behind.

    The file is written to ``workdir`` (default: a temporary folder) as ``decoded`` +
    ``decode_suffix``.  diffkit reads netCDF with one variable per channel (what the default
    ``Adapter.decode`` writes); for other formats pass ``read_back(path, layout)`` returning an
    array ``(N, *layout.sample_shape)`` in physical units.  ``check_adapter``'s own arguments are
    keyword-only; to pass an adapter option of the same name, build the adapter yourself.
    """
    import os
    import tempfile
    from pathlib import Path

    import numpy as np
    import torch
    from torch.utils.data import default_collate

    if isinstance(adapter, type):
        cls, who = adapter, _name(adapter)
        try:
            adapter = cls(**options)
        except Exception as e:
            _fail(f"adapter {who}({', '.join(f'{k}={v!r}' for k, v in options.items())}) raised "
                  f"{type(e).__name__}: {e}")
    else:
        cls, who = type(adapter), _name(type(adapter))
        if options:
            _fail(f"check_adapter got an adapter instance and options {sorted(options)}; pass the class to "
                  f"build it with options, or the instance alone")
    for attr in ("layout", "dataset", "decode"):
        if not hasattr(cls, attr):
            _fail(f"adapter {who} has no {attr!r}; adapters define .layout, .dataset(split) and "
                  f"classmethod decode (subclass diffkit.adapters.Adapter)")
    if not isinstance(inspect.getattr_static(cls, "decode"), classmethod):
        _fail(f"adapter {who}: decode must be a classmethod: `diffkit sample` calls it on the class with "
              f"the checkpoint's layout, without data")
    try:
        inspect.signature(cls.decode).bind(None, None, "out", attrs={})
    except TypeError:
        _fail(f"adapter {who}: decode{inspect.signature(cls.decode)} does not accept "
              f"decode(x, layout, path, *, attrs=None)")

    layout = adapter.layout
    back = _check_layout(layout, who)

    # -- datasets and items
    xs, labels, weights, keys, values = [], [], [], None, []
    for split in ("train", "val"):
        ds = adapter.dataset(split)
        try:
            n = len(ds)
        except TypeError:
            _fail(f"adapter {who}: dataset({split!r}) has no len(); return a torch Dataset with __len__")
        if split == "train" and n < 1:
            _fail(f"adapter {who}: the training split is empty")
        idx = sorted({int(round(k * (n - 1) / max(1, n_items - 1))) for k in range(n_items)}) if n else []
        for i in idx:
            item = ds[i]
            _check_item(item, layout, f"{who}, {split} item {i}")
            if keys is None:
                keys = set(item)
            elif set(item) != keys:
                _fail(f"adapter {who}: {split} item {i} has keys {sorted(item)}, another item {sorted(keys)}; "
                      f"every item needs the same keys to collate into a batch")
            again = ds[i]
            if not _same(dict(item), dict(again)):
                _fail(f"adapter {who}: {split} item {i} differs between two reads; an item must be a function of "
                      f"its index (exact resume relies on it; seed any augmentation with the index)")
            if split == "train":
                xs.append(item["x"])
                labels.append(item.get("label"))
                w = item.get("weight")
                weights.append(torch.ones(layout.sample_shape) if w is None else w.expand(layout.sample_shape))
                values.append(item)
    try:
        default_collate(values)
    except Exception as e:
        _fail(f"adapter {who}: items do not collate into a batch (torch default_collate): {type(e).__name__}: {e}")
    for bad in ("no-such-split",):
        try:
            adapter.dataset(bad)
        except (ValueError, KeyError, LookupError):
            pass
        except Exception as e:
            _fail(f"adapter {who}: dataset({bad!r}) raised {type(e).__name__}; raise ValueError naming the splits")
        else:
            _fail(f"adapter {who}: dataset({bad!r}) returned a dataset; an unknown split must raise ValueError")

    x = torch.stack(xs)
    w = torch.stack(weights)
    live = x[w > 0].double()
    if live.numel() > 1:
        m, s = float(live.mean()), float(live.std())
        if not (abs(m) <= 10 and 0.01 <= s <= 100):
            _fail(f"adapter {who}: training items do not look standardised (mean {m:.4g}, std {s:.4g}); "
                  f"items hold (x - mean) / std with the layout's mean and std")

    # -- decode round trip, from the layout a checkpoint holds
    x_keep = x.clone()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="diffkit-check-adapter-")
        workdir = tmp.name
    try:
        folder = Path(workdir)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"decoded{decode_suffix}"
        kw = {"attrs": {"checked_by": "diffkit.testing.check_adapter"}}
        if layout.num_classes and "labels" in inspect.signature(cls.decode).parameters:
            kw["labels"] = torch.stack(labels)  # class-conditional samples, decoded with their labels
        try:
            out = cls.decode(x, back, target, **kw)
        except Exception as e:
            _fail(f"adapter {who}: decode(x of shape {tuple(x.shape)}, layout, {target.name!r}) raised "
                  f"{type(e).__name__}: {e}")
        if not torch.equal(x, x_keep):
            _fail(f"adapter {who}: decode modified its input x in place")
        if not isinstance(out, (str, os.PathLike)) or not Path(out).exists():
            _fail(f"adapter {who}: decode returned {out!r}; return the path of the file it wrote")
        leftover = [p.name for p in folder.iterdir() if p.name.startswith(".")]
        if leftover:
            _fail(f"adapter {who}: decode left {leftover} behind; write to a temporary file and os.replace it")
        if read_back is None:
            try:
                got = _read_netcdf_back(out, back)
            except LookupError as e:
                _fail(f"adapter {who}: diffkit cannot read back what decode wrote to {Path(out).name}: {e}. "
                      f"Pass read_back=callable(path, layout) -> array (N, *layout.sample_shape)")
        else:
            got = read_back(out, back)
        got = np.asarray(got.detach().cpu() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
    finally:
        if tmp is not None:
            tmp.cleanup()
    want = layout.denormalize(x.double()).numpy()
    if got.shape != want.shape:
        _fail(f"adapter {who}: decode wrote samples of shape {got.shape} (as read back); expected {want.shape}")
    nan = np.isnan(got)
    if (nan & (w.numpy() > 0)).any():
        k = np.argwhere(nan & (w.numpy() > 0))[0]
        _fail(f"adapter {who}: the decoded file holds NaN at {tuple(int(i) for i in k)} (sample, channel, ...), "
              f"where the data is valid (weight > 0)")
    scale = float(np.abs(want).max()) if want.size else 1.0
    ok = np.isclose(got, want, rtol=rtol, atol=atol * max(scale, 1e-30)) | nan
    if not ok.all():
        k = tuple(int(i) for i in np.argwhere(~ok)[0])
        _fail(f"adapter {who}: decode does not write the physical values: at {k} (sample, channel, ...) the file "
              f"holds {got[k]!r}, layout.denormalize(x) is {want[k]!r} (rtol {rtol}, atol {atol} x {scale:.3g})")
    return adapter
