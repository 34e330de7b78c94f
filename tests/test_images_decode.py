"""Samples back to images: the PNG grid's pixel layout, the .npz contents, the file names, and
the labels passed to decoders (the base netCDF decoder and one written without ``labels``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffkit import Layout
from diffkit.adapters import Adapter, decode_samples, write_netcdf
from diffkit_images import ImageAdapter, make_grid, output_paths
from diffkit_images.grid import to_pixels


def _layout(C=1, H=3, W=4, num_classes=3, lo=0.0, hi=16.0, names=("zero", "one", "two")):
    mean, std = (lo + hi) / 2, (hi - lo) / 2
    attrs = {"adapter": "images", "range": [lo, hi], "display_min": [lo] * C, "display_max": [hi] * C}
    if num_classes:
        attrs["class_names"] = list(names)
    channels = {1: ("L",), 3: ("R", "G", "B")}.get(C, tuple(f"c{i}" for i in range(C)))
    return Layout(channels=channels, spatial=("y", "x"), shape=(H, W), num_classes=num_classes,
                  mean=torch.full((C, 1, 1), mean), std=torch.full((C, 1, 1), std), attrs=attrs)


def test_output_paths(tmp_path):
    assert output_paths(tmp_path / "s.png") == (tmp_path / "s.png", tmp_path / "s.npz")
    assert output_paths(tmp_path / "s.npz") == (tmp_path / "s.png", tmp_path / "s.npz")
    assert output_paths(tmp_path / "step-1.nc") == (tmp_path / "step-1.png", tmp_path / "step-1.npz")
    assert output_paths(tmp_path / "s") == (tmp_path / "s.png", tmp_path / "s.npz")
    new = tmp_path / "new"
    assert output_paths(str(new) + "/") == (new / "samples.png", new / "samples.npz")
    assert output_paths(tmp_path) == (tmp_path / "samples.png", tmp_path / "samples.npz")  # an existing folder


def test_grid_rows_per_class_and_nearest_neighbour_cells():
    pix = np.random.default_rng(0).integers(0, 256, (5, 3, 4, 1), dtype=np.uint8)
    labels = np.array([2, 0, 2, 1, 0])
    img, pos, s = make_grid(pix, labels, lambda k: f"class {k}", scale=5, pad=2)
    assert s == 5 and img.mode == "L"
    a = np.asarray(img)
    # rows: labels 0, 1, 2 in order; within a row the samples in their order
    lefts = sorted({p[0] for p in pos})
    tops = sorted({p[1] for p in pos})
    assert len(tops) == 3 and len(lefts) == 2 and tops == [2, 2 + 15 + 2, 2 + 2 * (15 + 2)]
    assert pos[1] == (lefts[0], tops[0]) and pos[4] == (lefts[1], tops[0])
    assert pos[3] == (lefts[0], tops[1])
    assert pos[0] == (lefts[0], tops[2]) and pos[2] == (lefts[1], tops[2])
    assert lefts[1] - lefts[0] == 4 * 5 + 2 and lefts[0] > 2  # a margin holds the row names
    assert a.shape == (2 + 3 * 17, lefts[1] + 20 + 2)
    for i, (left, top) in enumerate(pos):
        cell = a[top:top + 15, left:left + 20]
        assert np.array_equal(cell, np.kron(pix[i, ..., 0], np.ones((5, 5), np.uint8))), i
    # gaps are white, the empty slot of row 1 too, and the names are drawn in the margin (dark pixels)
    assert (a[:2] == 255).all() and (a[tops[1]:tops[1] + 15, lefts[1]:lefts[1] + 20] == 255).all()
    assert (a[:, :lefts[0] - 2] < 128).any()


def test_unconditional_grid_is_near_square_and_rgb_and_multichannel_cells():
    pix = np.random.default_rng(1).integers(0, 256, (7, 2, 2, 3), dtype=np.uint8)
    img, pos, s = make_grid(pix)
    assert img.mode == "RGB" and s == 32
    assert len({p[0] for p in pos}) == 3 and len({p[1] for p in pos}) == 3  # ceil(sqrt(7)) columns
    a = np.asarray(img)
    left, top = pos[6]
    assert np.array_equal(a[top:top + 64, left:left + 64], pix[6].repeat(32, 0).repeat(32, 1))
    five = np.random.default_rng(2).integers(0, 256, (2, 4, 3, 5), dtype=np.uint8)
    img, pos, s = make_grid(five, scale=1)
    left, top = pos[1]
    got = np.asarray(img)[top:top + 4, left:left + 15]
    assert np.array_equal(got, np.concatenate([five[1, ..., c] for c in range(5)], axis=1))  # side by side


def test_decode_writes_png_and_npz_consistently(tmp_path):
    lay = _layout()
    g = torch.Generator().manual_seed(0)
    x = 1.3 * torch.randn((6, 1, 3, 4), generator=g)  # some values beyond [-1, 1]: clamped in the PNG only
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    out = ImageAdapter.decode(x, lay, tmp_path / "s.png", labels=labels, attrs={"guidance": 2.0, "seed": 0})
    assert out == tmp_path / "s.png"
    z = np.load(tmp_path / "s.npz", allow_pickle=False)
    phys = lay.denormalize(x).numpy()
    assert np.array_equal(z["x"], phys) and z["x"].min() < 0 and z["x"].max() > 16  # raw, not clamped
    want = np.rint(np.clip(phys / 16.0, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(z["pixels"], want)
    assert z["labels"].tolist() == labels.tolist() and z["class_names"].tolist() == ["zero", "one", "two"]
    meta = json.loads(str(z["attrs"]))
    assert meta["guidance"] == 2.0 and meta["range"] == [0.0, 16.0]
    ref, pos, _ = make_grid(want, labels.numpy(), lambda k: f"{k}: {lay.attrs['class_names'][k]}")
    png = np.asarray(Image.open(out))
    assert np.array_equal(png, np.asarray(ref))
    left, top = pos[4]
    assert np.array_equal(png[top:top + 16 * 3:16, left:left + 16 * 4:16], want[4, ..., 0])
    assert to_pixels(phys, lay).dtype == np.uint8


def test_base_decode_stores_labels_as_a_coordinate_and_old_decoders_still_work(tmp_path):
    import xarray as xr

    lay = Layout(channels=("u",), spatial=("x",), shape=(5,), num_classes=2, attrs={"class_names": ["low", "high"]})
    x = torch.randn(4, 1, 5)
    labels = torch.tensor([1, 0, 1, 1])
    out = decode_samples(Adapter, x, lay, tmp_path / "s.nc", attrs={"seed": 1}, labels=labels)
    with xr.open_dataset(out) as ds:
        assert ds["label"].dims == ("sample",) and ds["label"].values.tolist() == [1, 0, 1, 1]
        assert ds["label"].attrs["flag_meanings"] == "low high"
        assert np.allclose(ds["u"].values, x[:, 0].numpy())

    class Old(Adapter):  # a decoder written before labels existed
        calls = []

        @classmethod
        def decode(cls, x, layout, path, *, attrs=None):
            cls.calls.append(attrs)
            return Path(path)

    assert decode_samples(Old, x, lay, tmp_path / "o.nc", attrs={"a": 1}, labels=labels) == tmp_path / "o.nc"
    assert Old.calls == [{"a": 1}]
    with pytest.raises(ValueError, match="3 labels for 4 samples"):
        write_netcdf(x, lay, tmp_path / "bad.nc", labels=labels[:3])


def test_the_adapter_passes_diffkits_adapter_contract(tmp_path):
    """diffkit.testing.check_adapter: protocol, layout through a checkpoint, items (a function of
    their index, flips included), and the decode round trip read back from the .npz."""
    from diffkit.testing import check_adapter

    def read_npz(path, layout):
        return np.load(Path(path).with_suffix(".npz"), allow_pickle=False)["x"]

    check_adapter(ImageAdapter, read_back=read_npz, decode_suffix=".png", max_images=200)
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "f" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(tmp_path / "f" / c / f"{i}.png")
    check_adapter(ImageAdapter, read_back=read_npz, decode_suffix=".png", source=str(tmp_path / "f"),
                  hflip=True, vflip=True, normalize="standard", rtol=1e-5, atol=1e-5)
