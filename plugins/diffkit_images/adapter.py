"""The ``images`` adapter: small image data sets as standardised ``(C, H, W)`` tensors.

Sources (the ``source`` option):

- ``"digits"`` (default): scikit-learn's bundled handwritten digits (``load_digits``: 1797
  images of 8x8 pixels, values 0..16, ten classes ``"0"``..``"9"``); nothing is downloaded;
- ``"skimage"``: patches cut from scikit-image's bundled sample images (``images``, ``patch``,
  ``stride``); each source image is a class, named after it;
- a folder of image files read with Pillow (``.png``, ``.jpg``/``.jpeg`` and the other
  extensions in :data:`EXTENSIONS`).  Class sub-folders give the labels (sorted folder names are
  the class names); image files directly in the folder and no sub-folders give an unconditional
  data set;
- a ``.npy`` or ``.npz`` file holding an array ``(N, H, W)``, ``(N, H, W, C)`` or
  ``(N, C, H, W)`` (``key``, ``labels_key``, ``channels_last``).

The words ``digits`` and ``skimage`` name the built-in sources; a folder of that name is
written ``./digits``.  Every source is read once, into one uint8 (8-bit data) or float32
tensor in memory, which suits data sets of up to a few hundred MB; items are standardised when
they are fetched.

Normalisation is explicit and exactly invertible: ``normalize="range"`` maps the value range
``range = [lo, hi]`` (default: 0..16 for the digits, 0..255 for 8-bit data, 0..65535 for
16-bit data, the data's min..max for float arrays) affinely onto [-1, 1];
``normalize="standard"`` subtracts the per-channel mean and divides by the per-channel
standard deviation of the training split.  Either way the offset and the scale are the
layout's ``mean`` and ``std``, stored in every checkpoint, so ``layout.denormalize`` undoes the
standardisation.  Values are never clamped, except when samples are written as a PNG
(:mod:`diffkit_images.grid`).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from diffkit.adapters import Adapter, split_of
from diffkit.errors import DiffkitError, NonFiniteError
from diffkit.layout import Layout

#: file extensions read from folders (case-insensitive)
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MODES = ("keep", "L", "RGB")
RESIZE = ("error", "resize", "crop")
NORMALIZE = ("range", "standard")
BUILTIN = ("digits", "skimage")
#: scikit-image sample images that ship inside its wheel (8-bit; read without a network)
SKIMAGE_IMAGES = ("astronaut", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock", "coffee",
                  "coins", "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo",
                  "microaneurysms", "moon", "page", "retina", "rocket", "text")
#: default images of ``source="skimage"``: three grayscale ones of different texture
SKIMAGE_DEFAULT = ("camera", "coins", "moon")
#: npz keys tried, in order, when ``key`` / ``labels_key`` are not given
ARRAY_KEYS = ("x", "images")
LABEL_KEYS = ("labels", "y")
SPATIAL = ("y", "x")


class ImageDataError(DiffkitError, ValueError):
    """Image data cannot be used as asked (no files, mixed sizes, bad option, ...)."""


class ImageWarning(UserWarning):
    """Some image files could not be read and were skipped (``strict=False``)."""


# ----------------------------------------------------------------------------- options
def _pair(v, what: str, *, positive_int: bool = True) -> tuple:
    """``v`` (a number or a pair) as a pair; for sizes, positive integers."""
    if v is None:
        return None
    t = (v, v) if np.ndim(v) == 0 else tuple(v)
    if len(t) != 2:
        raise ImageDataError(f"data.options.{what} must be one number or a pair [height, width], got {v!r}")
    if positive_int and not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in t):
        raise ImageDataError(f"data.options.{what} must hold integers >= 1, got {v!r}")
    return tuple(int(s) for s in t)


def _value_range(v) -> tuple[float, float] | None:
    if v is None:
        return None
    try:
        lo, hi = (float(a) for a in v)
    except (TypeError, ValueError):
        raise ImageDataError(f"data.options.range must be a pair [lo, hi] of numbers, got {v!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ImageDataError(f"data.options.range = {v!r} must be finite with hi > lo")
    return lo, hi


def _only_for(source_kind: str, wanted: str, what: str, **given) -> None:
    bad = [k for k, v in given.items() if v is not None]
    if bad and source_kind != wanted:
        raise ImageDataError(f"data.options {', '.join(bad)} apply only to {what}, and this source is "
                             f"{'a folder' if source_kind == 'folder' else repr(source_kind)}; remove them")


# ----------------------------------------------------------------------------- reading
class _Chunk:
    """Images of one size read together: ``a`` of shape ``(n, H, W, C)``, their labels, a name."""

    __slots__ = ("a", "labels", "name")

    def __init__(self, a: np.ndarray, labels, name: str):
        self.a, self.labels, self.name = a, labels, name


def _hwc(a: np.ndarray) -> np.ndarray:
    return a[..., None] if a.ndim == 2 else a


def load_digits_source() -> tuple[list[_Chunk], list[str], tuple[float, float]]:
    """scikit-learn's 8x8 digits: one chunk, class names ``"0"``..``"9"``, range 0..16."""
    from sklearn.datasets import load_digits

    d = load_digits()
    a = np.rint(d.images).astype(np.uint8)[..., None]  # integers 0..16 stored as float64
    return [_Chunk(a, np.asarray(d.target, dtype=np.int64), "digits")], [str(k) for k in range(10)], (0.0, 16.0)


def skimage_image(name: str) -> np.ndarray:
    """One of :data:`SKIMAGE_IMAGES` as an ``(H, W, C)`` uint8 array."""
    if name not in SKIMAGE_IMAGES:
        raise ImageDataError(f"unknown scikit-image sample image {name!r}; the ones bundled with scikit-image "
                             f"(read without a network) are: {', '.join(SKIMAGE_IMAGES)}")
    import skimage.data

    a = np.asarray(getattr(skimage.data, name)())
    if a.dtype != np.uint8:  # pragma: no cover - the list holds 8-bit images only
        raise ImageDataError(f"scikit-image sample {name!r} is {a.dtype}, not 8-bit")
    return _hwc(a)


def patches(a: np.ndarray, patch: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    """Non-padded patches of ``a`` ``(H, W, C)``, row-major, as ``(n, ph, pw, C)``."""
    (ph, pw), (sh, sw) = patch, stride
    if a.shape[0] < ph or a.shape[1] < pw:
        return np.zeros((0, ph, pw, a.shape[2]), a.dtype)
    v = np.lib.stride_tricks.sliding_window_view(a, (ph, pw), axis=(0, 1))[::sh, ::sw]  # (r, c, C, ph, pw)
    return np.ascontiguousarray(v.reshape(-1, *v.shape[2:]).transpose(0, 2, 3, 1))


def load_skimage_source(images, patch, stride) -> tuple[list[_Chunk], list[str], tuple[float, float]]:
    names = list(SKIMAGE_DEFAULT if images is None else ([images] if isinstance(images, str) else images))
    if not names:
        raise ImageDataError("data.options.images is empty; name at least one of " + ", ".join(SKIMAGE_IMAGES))
    chunks = []
    for k, n in enumerate(names):
        p = patches(skimage_image(n), patch, stride)
        if not len(p):
            raise ImageDataError(f"scikit-image sample {n!r} is smaller than one patch of {patch}; "
                                 f"lower data.options.patch")
        chunks.append(_Chunk(p, np.full(len(p), k, dtype=np.int64), f"skimage:{n}"))
    return chunks, names, (0.0, 255.0)


def image_files(root: Path) -> tuple[list[Path], np.ndarray | None, list[str] | None]:
    """``(files, labels, class_names)`` of a folder; labels from class sub-folders, else None."""
    def is_image(p: Path) -> bool:
        return p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith(".")

    top = sorted(p for p in root.iterdir() if is_image(p))
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [(d, sorted(p for p in d.rglob("*") if is_image(p) and not
                            any(part.startswith(".") for part in p.relative_to(d).parts))) for d in subs]
    per_class = [(d, fs) for d, fs in per_class if fs]
    if not top and not per_class:
        raise ImageDataError(f"the folder {root} holds no image files (accepted extensions: {', '.join(EXTENSIONS)}), "
                             f"neither directly nor in class sub-folders; put the images there or point "
                             f"data.options.source at the right folder")
    if top and per_class:
        raise ImageDataError(f"the folder {root} has image files at the top level (e.g. {top[0].name}) and class "
                             f"sub-folders ({', '.join(d.name for d, _ in per_class[:5])}); move the top-level files "
                             f"into a class sub-folder, or point data.options.source at a folder of one kind")
    if top:
        return top, None, None
    files = [f for _, fs in per_class for f in fs]
    labels = np.concatenate([np.full(len(fs), k, dtype=np.int64) for k, (_, fs) in enumerate(per_class)])
    return files, labels, [d.name for d, _ in per_class]


def read_image(path: Path) -> np.ndarray:
    """One image file as an ``(H, W, C)`` array (uint8 for 8-bit files, uint16/int32/float32 otherwise).

    Palette images become RGB (RGBA with transparency), bilevel ones 8-bit grayscale, CMYK and
    YCbCr ones RGB; multi-frame files (GIF, TIFF) give their first frame.
    """
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode == "PA":
            im = im.convert("RGBA")
        elif im.mode == "1":
            im = im.convert("L")
        elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        a = np.asarray(im)
    if a.dtype.kind not in "uif":  # pragma: no cover - every mode above maps to numbers
        raise ImageDataError(f"{path} has the unsupported pixel type {a.dtype}")
    if a.dtype.byteorder == ">" or (a.dtype.kind == "u" and a.dtype.itemsize > 1 and a.dtype != np.uint16):
        a = a.astype(a.dtype.newbyteorder("="))
    return _hwc(np.array(a))


def load_folder_source(root: Path, max_images, seed: int, strict: bool):
    files, labels, class_names = image_files(root)
    keep = _subset(len(files), max_images, seed)
    files = [files[i] for i in keep]
    labels = None if labels is None else labels[keep]
    chunks, bad = [], []
    for i, f in enumerate(files):
        try:
            a = read_image(f)
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            if strict:
                raise ImageDataError(f"cannot read the image file {f} ({type(e).__name__}: {e}); fix or remove it, "
                                     f"or set data.options.strict = false to skip unreadable files") from None
            bad.append(f)
            continue
        chunks.append(_Chunk(a[None], None if labels is None else labels[i:i + 1], str(f)))
    if bad:
        first = ", ".join(str(p) for p in bad[:3]) + (", ..." if len(bad) > 3 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) of {len(files)} in {root}: {first} "
                      f"(strict=True makes this an error)", ImageWarning, stacklevel=3)
    if not chunks:
        raise ImageDataError(f"none of the {len(files)} image files in {root} could be read "
                             f"(first: {bad[0]}); check that they are valid image files")
    return chunks, class_names, len(bad)


def load_array_source(path: Path, key, labels_key, channels_last):
    """An ``.npy`` / ``.npz`` file as ``([one chunk (N, H, W, C)], labels or None, default range or None)``."""
    labels = None
    if path.suffix.lower() == ".npy":
        if key is not None or labels_key is not None:
            raise ImageDataError(f"{path} is an .npy file (one array, no labels); data.options.key and labels_key "
                                 f"apply to .npz files -- save images and labels with np.savez(path, x=..., y=...)")
        a = np.load(path, allow_pickle=False)
    else:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            lk = labels_key if labels_key is not None else next((k for k in LABEL_KEYS if k in names), None)
            if labels_key is not None and labels_key not in names:
                raise ImageDataError(f"{path} has no array {labels_key!r} (data.options.labels_key); it holds "
                                     f"{', '.join(names)}")
            if key is None:
                cand = [k for k in ARRAY_KEYS if k in names] or [k for k in names if k != lk]
                if len(cand) != 1 and not any(k in names for k in ARRAY_KEYS):
                    raise ImageDataError(f"{path} holds the arrays {', '.join(names)}; say which one holds the images "
                                         f"with data.options.key (and the labels with labels_key)")
                key = cand[0]
            elif key not in names:
                raise ImageDataError(f"{path} has no array {key!r} (data.options.key); it holds {', '.join(names)}")
            a = z[key]
            if lk is not None:
                labels = z[lk]
    a = np.asarray(a)
    if a.dtype.kind not in "uifb":
        raise ImageDataError(f"the images in {path} have dtype {a.dtype}; give numbers (uint8, uint16 or float)")
    default_range = None
    if a.dtype.kind == "b":
        a, default_range = a.astype(np.uint8), (0.0, 1.0)
    if a.ndim == 3:
        if channels_last is not None:
            raise ImageDataError(f"the images in {path} have shape {a.shape} (N, H, W): one channel; remove "
                                 f"data.options.channels_last")
        a = a[..., None]
    elif a.ndim == 4:
        if channels_last is None:
            if a.shape[1] == a.shape[3]:
                raise ImageDataError(f"the images in {path} have shape {a.shape}: cannot tell (N, C, H, W) from "
                                     f"(N, H, W, C); set data.options.channels_last = true or false")
            channels_last = a.shape[3] < a.shape[1]  # the channel axis is the shorter of axes 1 and 3
        if not channels_last:
            a = a.transpose(0, 2, 3, 1)
    else:
        raise ImageDataError(f"the images in {path} have shape {a.shape}; expected (N, H, W), (N, H, W, C) or "
                             f"(N, C, H, W)")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            rows = np.flatnonzero(bad.reshape(len(a), -1).any(1))
            raise NonFiniteError(f"the images in {path} hold NaN or inf (first in image {int(rows[0])}; {len(rows)} "
                                 f"images affected); drop or repair those images before training")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(a),):
            raise ImageDataError(f"the labels in {path} have shape {labels.shape}, expected ({len(a)},): one per image")
        if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.rint(labels)):
            labels = labels.astype(np.int64)
        if labels.dtype.kind not in "iu" or (len(labels) and labels.min() < 0):
            raise ImageDataError(f"the labels in {path} must be integers >= 0 (class indices), got dtype "
                                 f"{labels.dtype} with minimum {labels.min() if len(labels) else None}")
        labels = labels.astype(np.int64)
    return [_Chunk(np.ascontiguousarray(a), labels, str(path))], labels, default_range


# ----------------------------------------------------------------------------- processing
def convert_mode(a: np.ndarray, mode: str) -> np.ndarray:
    """Channels (last axis) as ``mode``: ``"keep"``, ``"L"`` (ITU-R 601-2 luma, as Pillow; alpha
    dropped) or ``"RGB"`` (gray repeated, alpha dropped)."""
    c = a.shape[-1]
    if mode == "keep" or (mode == "L" and c == 1) or (mode == "RGB" and c == 3):
        return a
    if mode == "L":
        if c in (3, 4):
            if a.dtype == np.uint8:  # Pillow's fixed-point formula, so that the result equals Image.convert("L")
                r, g, b = (a[..., i].astype(np.uint32) for i in range(3))
                return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]
            luma = a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114
            return _as(luma[..., None], a.dtype)
        if c == 2:  # gray + alpha
            return a[..., :1]
    if mode == "RGB":
        if c in (1, 2):
            return np.repeat(a[..., :1], 3, axis=-1)
        if c == 4:
            return a[..., :3]
    raise ImageDataError(f"cannot convert {c}-channel images to mode {mode!r}; use mode = \"keep\"")


def _as(v: np.ndarray, dtype) -> np.ndarray:
    if np.dtype(dtype).kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(v), info.min, info.max).astype(dtype)
    return v.astype(dtype)


def center_crop(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = a.shape[-3:-1]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return a[..., top:top + size[0], left:left + size[1], :]


def resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample ``(n, H, W, C)`` to ``size`` (bilinear, antialiased when shrinking; aspect ratio not kept).
    Bilinear weights are convex, so integer data stays in its range and is rounded back to its type."""
    if tuple(a.shape[1:3]) == tuple(size):
        return a
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(torch.float64)
    r = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    return _as(r.numpy().transpose(0, 2, 3, 1), a.dtype)


def _subset(n: int, max_images, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``max_images`` of ``n`` items (all when None)."""
    if max_images is None or max_images >= n:
        return np.arange(n)
    g = np.random.default_rng(seed)
    return np.sort(g.permutation(n)[:max_images])


def split_indices(n: int, labels: np.ndarray | None, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / validation indices, stratified by class when there are labels.

    ``round(n * val_fraction)`` items (at least one when ``val_fraction > 0``) go to validation,
    shared among the classes in proportion to their sizes (largest remainders), every class
    keeping at least one training item.
    """
    g = np.random.default_rng(seed)
    if val_fraction == 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    n_val = max(1, int(round(n * val_fraction)))
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    quota = np.array([len(gr) * n_val / n for gr in groups])
    take = np.minimum(np.floor(quota).astype(int), [len(gr) - 1 for gr in groups])
    for k in np.argsort(-(quota - np.floor(quota)), kind="stable"):
        if take.sum() >= n_val:
            break
        if take[k] < len(groups[k]) - 1:
            take[k] += 1
    val = np.sort(np.concatenate([g.permutation(gr)[:t] for gr, t in zip(groups, take)]))
    if not len(val):
        raise ImageDataError(f"{n} images are too few for a validation split (each class keeps one training "
                             f"image); add images or set data.val_fraction = 0")
    train = np.setdiff1d(np.arange(n), val)
    return train, val


def channel_names(c: int) -> tuple[str, ...]:
    """Pillow's band names for 1 to 4 channels (``L``, ``L A``, ``R G B``, ``R G B A``), else ``c0, c1, ...``."""
    named = {1: ("L",), 2: ("L", "A"), 3: ("R", "G", "B"), 4: ("R", "G", "B", "A")}
    return named.get(c, tuple(f"c{i}" for i in range(c)))


# ----------------------------------------------------------------------------- datasets
class ImageSet(Dataset):
    """Items ``{"x": standardised (C, H, W) float32, "label": long}`` of one split.

    Flips enlarge the set instead of being drawn in ``__getitem__``: with ``hflip`` index
    ``i + n`` is image ``i`` mirrored left-right, with ``vflip`` index ``i + 2n`` (or ``i + n``
    alone) mirrored up-down, with both all four orientations.  The trainer's seeded shuffle
    mixes them, so each epoch shows every image once in every orientation, in random order, and
    an item stays a function of its index (exact resume with any number of DataLoader workers).
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None, layout: Layout, *,
                 hflip: bool = False, vflip: bool = False):
        self.data, self.labels, self.layout = data, labels, layout
        self.hflip, self.vflip = bool(hflip), bool(vflip)
        self.n = data.shape[0]
        self.orientations = (1 + self.hflip) * (1 + self.vflip)

    def __len__(self):
        return self.n * self.orientations

    def flips(self, i: int) -> tuple[bool, bool]:
        """``(left-right, up-down)`` flips of item ``i``."""
        k = i // self.n
        if self.hflip and self.vflip:
            return bool(k & 1), bool(k & 2)
        return (bool(k), False) if self.hflip else (False, bool(k))

    def __getitem__(self, i):
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i %= len(self)
        j = i % self.n
        x = self.data[j].to(torch.float32)
        h, v = self.flips(i)
        if h:
            x = x.flip(-1)
        if v:
            x = x.flip(-2)
        item = {"x": self.layout.normalize(x)}
        if self.labels is not None:
            item["label"] = self.labels[j]
        return item


# ----------------------------------------------------------------------------- adapter
class ImageAdapter(Adapter):
    """Images (scikit-learn digits, scikit-image patches, a folder of files, an .npy/.npz array) as (C, H, W) tensors.

    Options (all keyword, see docs/images.md):

    - ``source`` (``"digits"``): ``"digits"``, ``"skimage"``, a folder of images or an ``.npy`` /
      ``.npz`` file;
    - ``conditional`` (None = when the source has labels): train class-conditionally
      (``layout.num_classes`` = the number of classes; guidance by Ho & Salimans 2022);
    - ``mode`` (``"keep"``): ``"keep"``, ``"L"`` (grayscale) or ``"RGB"``;
    - ``resize`` (``"error"``), ``size`` (None): images of another size than ``size`` (default:
      the first image's) are an error, resampled (``"resize"``) or centre-cropped (``"crop"``);
    - ``normalize`` (``"range"``), ``range`` (None = the data type's range): ``range = [lo, hi]``
      mapped onto [-1, 1], or ``"standard"`` (per-channel mean and std of the training split);
    - ``hflip`` / ``vflip`` (False): flipped copies of the training images (never of validation
      ones), shuffled in by the trainer (see :class:`ImageSet`);
    - ``val_fraction`` (0.1), ``seed`` (0): the seeded, class-stratified validation split;
    - ``max_images`` (None): a seeded random subset of this many images (files not chosen are not read);
    - ``strict`` (False): unreadable files are an error instead of being skipped with one warning;
    - ``class_names`` (None): names of the classes of an array file's labels;
    - ``images`` (``["camera", "coins", "moon"]``), ``patch`` (32), ``stride`` (= patch): for ``"skimage"``;
    - ``key``, ``labels_key`` (None = ``x``/``images`` and ``labels``/``y``), ``channels_last``
      (None = the shorter of axes 1 and 3 holds the channels): for array files.
    """

    name = "images"

    def __init__(self, source: str = "digits", conditional: bool | None = None, mode: str = "keep",
                 resize: str = "error", size: int | Sequence[int] | None = None, normalize: str = "range",
                 range: Sequence[float] | None = None, hflip: bool = False, vflip: bool = False,  # noqa: A002
                 val_fraction: float = 0.1, seed: int = 0, max_images: int | None = None, strict: bool = False,
                 class_names: Sequence[str] | None = None, images: Sequence[str] | str | None = None,
                 patch: int | Sequence[int] | None = None, stride: int | Sequence[int] | None = None,
                 key: str | None = None, labels_key: str | None = None, channels_last: bool | None = None):
        for opt, v, allowed in (("mode", mode, MODES), ("resize", resize, RESIZE), ("normalize", normalize, NORMALIZE)):
            if v not in allowed:
                raise ImageDataError(f"data.options.{opt} must be one of {', '.join(map(repr, allowed))}, got {v!r}")
        if not 0 <= val_fraction < 1:
            raise ImageDataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        size = _pair(size, "size")
        if max_images is not None and (not isinstance(max_images, int) or isinstance(max_images, bool)
                                       or max_images < 1):
            raise ImageDataError(f"data.options.max_images must be an integer >= 1, got {max_images!r}")
        if resize != "error" and size is None:
            raise ImageDataError(f"data.options.resize = {resize!r} needs data.options.size = [height, width]")
        value_range = _value_range(range)
        if value_range is not None and normalize != "range":
            raise ImageDataError("data.options.range applies to normalize = \"range\"; remove it or the normalize "
                                 "option")

        src = str(source)
        kind = src if src in BUILTIN else ("array" if Path(src).suffix.lower() in (".npy", ".npz") else "folder")
        _only_for(kind, "skimage", "source = \"skimage\"", images=images, patch=patch, stride=stride)
        _only_for(kind, "array", ".npy/.npz sources", key=key, labels_key=labels_key, channels_last=channels_last)
        if class_names is not None and kind not in ("array",):
            raise ImageDataError(f"data.options.class_names applies to array files; source {src!r} names its "
                                 f"classes itself")
        names, skipped = None, 0
        if kind == "digits":
            chunks, names, default_range = load_digits_source()
        elif kind == "skimage":
            p = _pair(32 if patch is None else patch, "patch")
            st = _pair(p if stride is None else stride, "stride")
            chunks, names, default_range = load_skimage_source(images, p, st)
        else:
            path = Path(src).expanduser()
            if not path.exists():
                raise ImageDataError(f"data.options.source {src!r}: no such {'file' if kind == 'array' else 'folder'}; "
                                     f"give \"digits\", \"skimage\", a folder of images ({', '.join(EXTENSIONS)}) "
                                     f"or an .npy/.npz file")
            if kind == "folder" and not path.is_dir():
                raise ImageDataError(f"data.options.source {src!r} is a file but not .npy/.npz; give a folder of "
                                     f"images or an array file")
            default_range = None
            if kind == "folder":
                chunks, names, skipped = load_folder_source(path, max_images, seed, strict)
            else:
                chunks, labels, default_range = load_array_source(path, key, labels_key, channels_last)
                if labels is not None:
                    k = int(labels.max()) + 1 if len(labels) else 0
                    if class_names is not None and len(class_names) < k:
                        raise ImageDataError(f"data.options.class_names has {len(class_names)} names but the labels in "
                                             f"{path} go up to {k - 1}; give one name per class")
                    names = [str(c) for c in class_names] if class_names is not None else [str(c) for c in np.arange(k)]
                elif class_names is not None:
                    raise ImageDataError(f"data.options.class_names was given but {path} holds no labels "
                                         f"(labels_key, or an array named {' or '.join(LABEL_KEYS)})")
        if kind != "folder":  # a folder chooses its subset before reading
            chunks = _subset_chunks(chunks, max_images, seed)

        data, labels, dtype = self._assemble(chunks, mode, resize, size)
        if default_range is None:
            default_range = dtype_range(dtype, data)
        if conditional is None:
            conditional = labels is not None and len(names or ()) > 1
        if conditional and labels is None:
            raise ImageDataError(f"data.options.conditional = true but source {src!r} has no class labels; give "
                                 f"class sub-folders (folder), labels_key (npz), or set conditional = false")
        if not conditional:
            labels = None
        self.source, self.kind, self.skipped = src, kind, skipped
        self.class_names = list(names) if labels is not None else None
        self.train_idx, self.val_idx = split_indices(len(data), None if labels is None else labels.numpy(),
                                                     val_fraction, seed)
        if not len(self.train_idx):  # pragma: no cover - split_indices keeps one per class
            raise ImageDataError("the training split is empty; lower val_fraction")
        self.data, self.labels = data, labels
        self.hflip, self.vflip = bool(hflip), bool(vflip)
        self._layout = self._make_layout(normalize, value_range, default_range, mode, resize, size, seed)

    # -- assembling ----------------------------------------------------------------------
    @staticmethod
    def _assemble(chunks: list[_Chunk], mode: str, policy: str, size):
        chunks = [_Chunk(convert_mode(c.a, mode), c.labels, c.name) for c in chunks if len(c.a)]
        if not chunks:
            raise ImageDataError("the source holds no images (an array with N = 0?); give at least one image")
        c0 = chunks[0]
        for c in chunks[1:]:
            if c.a.shape[-1] != c0.a.shape[-1]:
                raise ImageDataError(f"{c.name} has {c.a.shape[-1]} channel(s) but {c0.name} has {c0.a.shape[-1]}; "
                                     f"set data.options.mode = \"RGB\" or \"L\" to convert them all")
            if c.a.dtype != c0.a.dtype:
                raise ImageDataError(f"{c.name} holds {c.a.dtype} pixels but {c0.name} holds {c0.a.dtype} (e.g. 8-bit "
                                     f"and 16-bit files); convert the files to one bit depth")
        want = size if size is not None else tuple(c0.a.shape[1:3])
        out = []
        for c in chunks:
            hw = tuple(c.a.shape[1:3])
            if hw == want:
                out.append(c.a)
            elif policy == "error":
                raise ImageDataError(f"{c.name} is {hw[0]}x{hw[1]} (height x width) but the images must be "
                                     f"{want[0]}x{want[1]}"
                                     f"{' (data.options.size)' if size is not None else f' (the size of {c0.name})'}; "
                                     f"set data.options.resize = \"resize\" or \"crop\" with size = "
                                     f"[{want[0]}, {want[1]}]")
            elif policy == "crop":
                if hw[0] < want[0] or hw[1] < want[1]:
                    raise ImageDataError(f"{c.name} is {hw[0]}x{hw[1]}, smaller than the crop size "
                                         f"{want[0]}x{want[1]}; "
                                         f"use resize = \"resize\" or a smaller size")
                out.append(center_crop(c.a, want))
            else:
                out.append(resize(c.a, want))
        a = np.concatenate(out) if len(out) > 1 else out[0]
        a = np.ascontiguousarray(a.transpose(0, 3, 1, 2))
        data = torch.from_numpy(a) if a.dtype == np.uint8 else torch.from_numpy(a.astype(np.float32))
        labels = None
        if all(c.labels is not None for c in chunks):
            labels = torch.from_numpy(np.concatenate([c.labels for c in chunks]).astype(np.int64))
        return data, labels, c0.a.dtype

    def _make_layout(self, normalize, value_range, default_range, mode, policy, size, seed) -> Layout:
        C = self.data.shape[1]
        train = self.data[torch.as_tensor(self.train_idx)]
        if normalize == "range":
            if value_range is None:
                value_range = default_range
            lo, hi = value_range
            mean = torch.full((C, 1, 1), (lo + hi) / 2)
            std = torch.full((C, 1, 1), (hi - lo) / 2)
            dmin, dmax = [lo] * C, [hi] * C
        else:
            t = train.to(torch.float64).transpose(0, 1).reshape(C, -1)
            m, s = t.mean(1), t.std(1, correction=0)
            const = [i for i in range(C) if not s[i] > 0]
            if const:
                raise ImageDataError(f"channel(s) {const} are constant over the training images; they cannot be "
                                     f"standardised -- use normalize = \"range\"")
            mean, std = m.float().reshape(C, 1, 1), s.float().reshape(C, 1, 1)
            dmin, dmax = t.min(1).values.tolist(), t.max(1).values.tolist()
        attrs: dict[str, Any] = dict(
            adapter=self.name, source=self.source if self.kind in BUILTIN else Path(self.source).name,
            normalize=normalize, display_min=[float(v) for v in dmin], display_max=[float(v) for v in dmax],
            dtype=str(self.data.dtype).replace("torch.", ""), mode=mode, resize=policy,
            hflip=int(self.hflip), vflip=int(self.vflip), seed=seed,
        )
        if normalize == "range":
            attrs["range"] = [float(value_range[0]), float(value_range[1])]
        if self.class_names is not None:
            attrs["class_names"] = list(self.class_names)
        return Layout(channels=channel_names(C), spatial=SPATIAL, shape=tuple(self.data.shape[2:]),
                      num_classes=len(self.class_names) if self.class_names is not None else 0,
                      mean=mean, std=std, attrs=attrs)

    # -- protocol ------------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        return self._layout

    def dataset(self, split: str) -> Dataset:
        idx = torch.as_tensor(split_of(split, self.train_idx, self.val_idx), dtype=torch.long)
        aug = split == "train"
        return ImageSet(self.data[idx], None if self.labels is None else self.labels[idx], self._layout,
                        hflip=self.hflip and aug, vflip=self.vflip and aug)

    @classmethod
    def decode(cls, x: torch.Tensor, layout: Layout, path, *, attrs: dict | None = None,
               labels: torch.Tensor | None = None) -> Path:
        """Write standardised samples ``(N, C, H, W)`` as a PNG grid and an ``.npz`` of the
        de-normalised values; returns the PNG's path.  See :func:`diffkit_images.grid.write_samples`
        for the file names and contents."""
        from .grid import write_samples

        x = torch.as_tensor(x).detach().float().cpu()
        if x.ndim == len(layout.sample_shape):
            x = x[None]
        layout.check(x, "samples")
        return write_samples(layout.denormalize(x), layout, path, attrs=attrs, labels=labels)


def dtype_range(dtype, data: torch.Tensor) -> tuple[float, float]:
    """The default value range of ``normalize="range"``: 0..255 for uint8 data, 0..65535 for
    uint16 data, the data's min..max otherwise (float arrays, 32-bit integer images)."""
    if dtype == np.uint8:
        return 0.0, 255.0
    if dtype == np.uint16:
        return 0.0, 65535.0
    lo, hi = float(data.min()), float(data.max())
    if not hi > lo:
        raise ImageDataError(f"all image values equal {lo}; nothing to learn (or give data.options.range)")
    return lo, hi


def _subset_chunks(chunks: list[_Chunk], max_images, seed: int) -> list[_Chunk]:
    n = sum(len(c.a) for c in chunks)
    keep = _subset(n, max_images, seed)
    if len(keep) == n:
        return chunks
    out, start = [], 0
    for c in chunks:
        sel = keep[(keep >= start) & (keep < start + len(c.a))] - start
        if len(sel):
            out.append(_Chunk(c.a[sel], None if c.labels is None else c.labels[sel], c.name))
        start += len(c.a)
    return out
