"""diffkit's images plugin: small image data sets, class-conditional DDPMs, PNG grids.

- the ``images`` adapter (:class:`ImageAdapter`): scikit-learn's bundled 8x8 digits (the
  default; no downloads), patches of scikit-image's bundled sample images, a folder of image
  files (class sub-folders give labels) or an ``.npy``/``.npz`` array, as standardised
  ``(C, H, W)`` tensors with an explicit, invertible normalisation stored in the layout;
- its decoder writes samples as a PNG grid (one row per class) and an ``.npz`` of the
  de-normalised values (:mod:`diffkit_images.grid`).

Class-conditional models are trained with label dropout (``loss.p_uncond``) and sampled with
classifier-free guidance (Ho & Salimans 2022): ``diffkit sample RUN --guidance 2 --out s.png``.
Importing this package does not import Pillow, scikit-learn, scikit-image or matplotlib; see
docs/images.md.
"""
from __future__ import annotations

from diffkit.hookspecs import hookimpl

from .adapter import EXTENSIONS, SKIMAGE_IMAGES, ImageAdapter, ImageDataError, ImageWarning
from .grid import make_grid, output_paths, write_samples

__all__ = ["ImageAdapter", "ImageDataError", "ImageWarning", "EXTENSIONS", "SKIMAGE_IMAGES",
           "make_grid", "output_paths", "write_samples"]


@hookimpl
def diffkit_adapters():
    return {"images": ImageAdapter}


@hookimpl
def diffkit_commands():
    from .observe import register_data

    return {"data images": register_data}


@hookimpl
def diffkit_quickstarts():
    from .quickstart import quickstart

    return {"images": quickstart}
