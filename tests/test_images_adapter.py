"""The ``images`` adapter reads what it says it reads: digits, skimage patches, folders, arrays.

Folders are written here with Pillow (PNG is lossless, so every pixel read back is checked
against the array written); the digits against scikit-learn's own ``load_digits``.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffkit import ConfigError, Layout, NonFiniteError
from diffkit.config import Config, DataConfig
from diffkit_images import ImageAdapter, ImageDataError, ImageWarning
from diffkit_images.adapter import SKIMAGE_IMAGES, split_indices


@pytest.fixture(scope="module")
def digits():
    return ImageAdapter(source="digits", val_fraction=0.1)


def _png(path, a):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return a


def _rand(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ----------------------------------------------------------------------------- digits
def test_digits_shape_labels_and_values_match_scikit_learn(digits):
    from sklearn.datasets import load_digits

    d = load_digits()
    lay = digits.layout
    assert lay.shape == (8, 8) and lay.channels == ("L",) and lay.spatial == ("y", "x")
    assert lay.num_classes == 10 and lay.attrs["class_names"] == [str(k) for k in range(10)]
    assert digits.data.shape == (1797, 1, 8, 8) and digits.data.dtype == torch.uint8
    assert np.array_equal(digits.data[:, 0].numpy(), d.images.astype(np.uint8))
    assert np.array_equal(digits.labels.numpy(), d.target)
    assert lay.attrs["range"] == [0.0, 16.0]
    # the split: disjoint, complete, stratified (every class ~10 % in validation), seeded
    tr, va = digits.train_idx, digits.val_idx
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 1797 and len(va) == 180
    per_class_val = np.bincount(d.target[va], minlength=10)
    assert np.all(np.abs(per_class_val - np.bincount(d.target) * 0.1) <= 1), per_class_val
    assert np.array_equal(ImageAdapter(val_fraction=0.1).val_idx, va)
    assert not np.array_equal(ImageAdapter(val_fraction=0.1, seed=1).val_idx, va)
    # items: standardised x and the right label
    ds = digits.dataset("val")
    assert len(ds) == 180
    it = ds[5]
    assert it["x"].shape == (1, 8, 8) and it["x"].dtype == torch.float32
    assert int(it["label"]) == d.target[va[5]]


def test_digits_normalisation_maps_the_range_to_unit_interval_and_inverts_exactly(digits):
    lay = digits.layout
    raw = digits.data[torch.as_tensor(digits.train_idx)].float()
    x = torch.stack([digits.dataset("train")[i]["x"] for i in range(len(raw))])
    assert torch.equal(x, lay.normalize(raw))
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0  # 0 -> -1 and 16 -> 1
    assert torch.equal(lay.denormalize(x), raw)  # exact: the offset and scale are 8
    # an explicit range: 0..32 puts the digits in [-1, 0]
    lay2 = ImageAdapter(range=[0, 32], max_images=50).layout
    assert lay2.normalize(torch.tensor(16.0)).item() == 0.0 and lay2.attrs["range"] == [0.0, 32.0]


def test_standard_normalisation_uses_training_statistics_per_channel(tmp_path):
    a = _rand((40, 6, 7, 3), 0).astype(np.float32) * np.array([1.0, 2.0, 0.5], np.float32)
    np.savez(tmp_path / "a.npz", x=a)
    ad = ImageAdapter(source=str(tmp_path / "a.npz"), normalize="standard", val_fraction=0.25)
    x = torch.stack([it["x"] for it in ad.dataset("train")])
    assert x.shape == (30, 3, 6, 7)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-5)
    raw = torch.from_numpy(a.transpose(0, 3, 1, 2))[torch.as_tensor(ad.train_idx)]
    assert torch.allclose(ad.layout.denormalize(x), raw, atol=1e-4)
    with pytest.raises(ImageDataError, match="range applies to normalize"):
        ImageAdapter(source=str(tmp_path / "a.npz"), normalize="standard", range=[0, 1])


def test_eight_bit_round_trip_is_exact_after_rounding(tmp_path):
    imgs = [_png(tmp_path / "f" / f"{i}.png", _rand((5, 4, 3), i)) for i in range(6)]
    ad = ImageAdapter(source=str(tmp_path / "f"), val_fraction=0)
    lay = ad.layout
    assert lay.attrs["range"] == [0.0, 255.0] and lay.channels == ("R", "G", "B")
    x = torch.stack([it["x"] for it in ad.dataset("train")])
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    back = lay.denormalize(x)
    raw = torch.from_numpy(np.stack(imgs).transpose(0, 3, 1, 2)).float()
    assert (back - raw).abs().max() < 1e-4 and torch.equal(back.round(), raw)


# ----------------------------------------------------------------------------- folders
def test_class_subfolders_give_labels_and_class_names(tmp_path):
    root = tmp_path / "data"
    cats = [_png(root / "cats" / f"c{i}.png", _rand((12, 10, 3), i)) for i in range(3)]
    dogs = [_png(root / "dogs" / "nested" / f"d{i}.png", _rand((12, 10, 3), 10 + i)) for i in range(2)]
    (root / "notes.txt").write_text("not an image")  # ignored: not an image extension
    (root / ".hidden").mkdir()
    _png(root / ".hidden" / "x.png", _rand((3, 3), 0))  # hidden folders are not classes
    ad = ImageAdapter(source=str(root), val_fraction=0)
    lay = ad.layout
    assert lay.num_classes == 2 and lay.attrs["class_names"] == ["cats", "dogs"]
    assert lay.shape == (12, 10) and lay.channels == ("R", "G", "B")
    assert ad.labels.tolist() == [0, 0, 0, 1, 1]
    want = np.stack(cats + dogs).transpose(0, 3, 1, 2)
    assert np.array_equal(ad.data.numpy(), want)
    items = ad.dataset("train")
    assert [int(items[i]["label"]) for i in range(5)] == [0, 0, 0, 1, 1]
    # conditional = false drops the labels
    unc = ImageAdapter(source=str(root), val_fraction=0, conditional=False)
    assert unc.layout.num_classes == 0 and "label" not in unc.dataset("train")[0]


def test_flat_folder_is_unconditional_and_cannot_be_made_conditional(tmp_path):
    for i in range(4):
        _png(tmp_path / f"{i}.png", _rand((6, 6), i))
    ad = ImageAdapter(source=str(tmp_path), val_fraction=0.25)
    assert ad.layout.num_classes == 0 and ad.layout.channels == ("L",)
    assert "label" not in ad.dataset("train")[0] and len(ad.dataset("val")) == 1
    with pytest.raises(ImageDataError, match="conditional = true but source .* has no class labels"):
        ImageAdapter(source=str(tmp_path), conditional=True)


def test_empty_folder_is_an_error_naming_it_and_the_extensions(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageDataError, match=r"empty holds no image files \(accepted extensions: \.png, \.jpg"):
        ImageAdapter(source=str(tmp_path / "empty"))
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("x")
    with pytest.raises(ImageDataError, match="txt holds no image files"):
        ImageAdapter(source=str(tmp_path / "txt"))
    with pytest.raises(ImageDataError, match="no such folder"):
        ImageAdapter(source=str(tmp_path / "missing"))


def test_mixed_sizes_error_names_the_first_offending_file(tmp_path):
    _png(tmp_path / "a.png", _rand((8, 8), 0))
    _png(tmp_path / "b.png", _rand((8, 8), 1))
    _png(tmp_path / "c.png", _rand((10, 12), 2))
    _png(tmp_path / "d.png", _rand((9, 9), 3))
    with pytest.raises(ImageDataError, match=r"c\.png is 10x12 \(height x width\) but the images must be 8x8 "
                                             r"\(the size of .*a\.png\); set data.options.resize"):
        ImageAdapter(source=str(tmp_path))
    with pytest.raises(ImageDataError, match=r"a\.png is 8x8 .* must be 6x6 \(data.options.size\)"):
        ImageAdapter(source=str(tmp_path), size=6)
    with pytest.raises(ImageDataError, match="needs data.options.size"):
        ImageAdapter(source=str(tmp_path), resize="crop")


def test_crop_and_resize_give_the_declared_size(tmp_path):
    big = _png(tmp_path / "a.png", _rand((10, 12), 0))
    _png(tmp_path / "b.png", _rand((8, 9), 1))
    cr = ImageAdapter(source=str(tmp_path), resize="crop", size=[6, 8], val_fraction=0)
    assert cr.layout.shape == (6, 8) and cr.data.shape == (2, 1, 6, 8)
    assert np.array_equal(cr.data[0, 0].numpy(), big[2:8, 2:10])  # the centre
    rs = ImageAdapter(source=str(tmp_path), resize="resize", size=4, val_fraction=0)
    assert rs.layout.shape == (4, 4) and rs.data.dtype == torch.uint8
    with pytest.raises(ImageDataError, match=r"b\.png is 8x9, smaller than the crop size 9x9"):
        ImageAdapter(source=str(tmp_path), resize="crop", size=9)
    # constant images stay constant (convex weights); otherwise Pillow's antialiased bilinear resize
    flat = np.full((8, 8), 200, np.uint8)
    tmp_path = tmp_path / "other"
    _png(tmp_path / "c" / "a.png", flat)
    blocks = _png(tmp_path / "c" / "b.png",
                  np.kron(np.array([[0, 100], [200, 50]], np.uint8), np.ones((4, 4), np.uint8)))
    r2 = ImageAdapter(source=str(tmp_path / "c"), resize="resize", size=[4, 6], val_fraction=0)
    assert (r2.data[0] == 200).all()
    pil = np.asarray(Image.fromarray(blocks).resize((6, 4), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(r2.data[1, 0].numpy().astype(int) - pil).max() <= 1


def test_modes_convert_channels(tmp_path):
    rgba = _png(tmp_path / "x" / "a.png", _rand((5, 5, 4), 0))
    gray = _png(tmp_path / "x" / "b.png", _rand((5, 5), 1))
    with pytest.raises(ImageDataError, match=r"b\.png has 1 channel\(s\) but .*a\.png has 4; set data.options.mode"):
        ImageAdapter(source=str(tmp_path / "x"))
    rgb = ImageAdapter(source=str(tmp_path / "x"), mode="RGB", val_fraction=0)
    assert rgb.layout.channels == ("R", "G", "B")
    assert np.array_equal(rgb.data[0].numpy(), rgba[..., :3].transpose(2, 0, 1))
    assert np.array_equal(rgb.data[1].numpy(), np.stack([gray] * 3))
    lum = ImageAdapter(source=str(tmp_path / "x"), mode="L", val_fraction=0)
    want = np.asarray(Image.fromarray(rgba).convert("RGB").convert("L"))
    assert np.array_equal(lum.data[0, 0].numpy(), want)  # Pillow's own luma
    with pytest.raises(ImageDataError, match="data.options.mode must be one of"):
        ImageAdapter(mode="CMYK")


def test_corrupt_files_are_skipped_with_one_warning_or_raise_when_strict(tmp_path):
    for i in range(3):
        _png(tmp_path / f"good{i}.png", _rand((4, 4), i))
    (tmp_path / "bad1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "bad2.jpg").write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ad = ImageAdapter(source=str(tmp_path), val_fraction=0)
    ours = [w for w in caught if issubclass(w.category, ImageWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    msg = str(ours[0].message)
    assert "skipped 2 unreadable image file(s) of 5" in msg and "bad1.png" in msg and "bad2.jpg" in msg
    assert ad.data.shape[0] == 3 and ad.skipped == 2
    with pytest.raises(ImageDataError, match=r"cannot read the image file .*bad1\.png .*strict = false"):
        ImageAdapter(source=str(tmp_path), strict=True)


# ----------------------------------------------------------------------------- arrays
def test_npy_and_npz_layouts(tmp_path):
    a = _rand((7, 5, 6), 0)
    np.save(tmp_path / "a.npy", a)
    ad = ImageAdapter(source=str(tmp_path / "a.npy"), val_fraction=0)
    assert ad.layout.shape == (5, 6) and ad.layout.num_classes == 0
    assert np.array_equal(ad.data[:, 0].numpy(), a)

    hwc = _rand((9, 5, 6, 3), 1)
    y = np.arange(9) % 3
    np.savez(tmp_path / "hwc.npz", x=hwc, y=y)
    ad = ImageAdapter(source=str(tmp_path / "hwc.npz"), val_fraction=0, class_names=["a", "b", "c"])
    assert ad.data.shape == (9, 3, 5, 6) and np.array_equal(ad.data.numpy(), hwc.transpose(0, 3, 1, 2))
    assert ad.layout.num_classes == 3 and ad.layout.attrs["class_names"] == ["a", "b", "c"]
    assert ad.labels.tolist() == y.tolist()

    chw = hwc.transpose(0, 3, 1, 2).copy()
    np.savez(tmp_path / "chw.npz", imgs=chw, target=y)
    ad = ImageAdapter(source=str(tmp_path / "chw.npz"), key="imgs", labels_key="target", val_fraction=0)
    assert np.array_equal(ad.data.numpy(), chw) and ad.layout.attrs["class_names"] == ["0", "1", "2"]
    # explicit channels_last overrides the rule "the shorter of axes 1 and 3 is the channel axis"
    ad = ImageAdapter(source=str(tmp_path / "chw.npz"), key="imgs", channels_last=True, val_fraction=0)
    assert ad.layout.shape == (3, 5) and ad.layout.num_channels == 6

    np.save(tmp_path / "none.npy", np.zeros((0, 4, 4), np.uint8))
    with pytest.raises(ImageDataError, match="holds no images"):
        ImageAdapter(source=str(tmp_path / "none.npy"))
    np.savez(tmp_path / "sq.npz", x=_rand((4, 3, 5, 3), 2))
    with pytest.raises(ImageDataError, match="cannot tell .* set data.options.channels_last"):
        ImageAdapter(source=str(tmp_path / "sq.npz"))
    np.savez(tmp_path / "two.npz", a=chw, b=chw)
    with pytest.raises(ImageDataError, match="holds the arrays a, b; say which one .* data.options.key"):
        ImageAdapter(source=str(tmp_path / "two.npz"))
    with pytest.raises(ImageDataError, match="has no array 'q'"):
        ImageAdapter(source=str(tmp_path / "hwc.npz"), key="q")
    with pytest.raises(ImageDataError, match="class_names has 2 names but the labels .* go up to 2"):
        ImageAdapter(source=str(tmp_path / "hwc.npz"), class_names=["a", "b"])


def test_float_arrays_use_their_min_max_and_nan_is_an_error(tmp_path):
    a = np.random.default_rng(0).normal(3.0, 2.0, (10, 4, 4)).astype(np.float32)
    np.save(tmp_path / "f.npy", a)
    ad = ImageAdapter(source=str(tmp_path / "f.npy"), val_fraction=0)
    assert ad.layout.attrs["range"] == pytest.approx([float(a.min()), float(a.max())])
    x = torch.stack([it["x"] for it in ad.dataset("train")])
    assert abs(float(x.min()) + 1) < 1e-6 and abs(float(x.max()) - 1) < 1e-6
    a[3, 1, 2] = np.nan
    a[7, 0, 0] = np.inf
    np.save(tmp_path / "nan.npy", a)
    with pytest.raises(NonFiniteError, match=r"NaN or inf \(first in image 3; 2 images affected\)"):
        ImageAdapter(source=str(tmp_path / "nan.npy"))


# ----------------------------------------------------------------------------- augmentation
def test_flips_only_in_the_training_split_and_only_when_asked(tmp_path):
    a = np.zeros((20, 4, 6), np.uint8)
    a[:, 0, 0] = 255  # a bright top-left corner: a flip moves it
    a[:, 1, 1] = np.arange(20)  # tells the images apart
    np.save(tmp_path / "a.npy", a)
    src = str(tmp_path / "a.npy")

    def corners(ds):
        return [tuple(int(v) for v in (ds[i]["x"][0] == 1).nonzero()[0]) for i in range(len(ds))]

    plain = ImageAdapter(source=src, val_fraction=0.25)
    assert set(corners(plain.dataset("train"))) == {(0, 0)} and len(plain.dataset("train")) == 15  # off by default
    h = ImageAdapter(source=src, hflip=True, val_fraction=0.25)
    tr = h.dataset("train")
    assert len(tr) == 30 and corners(tr) == [(0, 0)] * 15 + [(0, 5)] * 15
    assert torch.equal(tr[17]["x"], tr[2]["x"].flip(-1))  # index i + n: image i mirrored
    assert len(h.dataset("val")) == 5 and set(corners(h.dataset("val"))) == {(0, 0)}
    hv = ImageAdapter(source=src, hflip=True, vflip=True, val_fraction=0.25)
    tr = hv.dataset("train")
    assert len(tr) == 60 and sorted(set(corners(tr))) == [(0, 0), (0, 5), (3, 0), (3, 5)]
    assert all(corners(tr).count(c) == 15 for c in set(corners(tr)))  # every orientation of every image
    assert torch.equal(tr[47]["x"], tr[2]["x"].flip(-1).flip(-2))
    assert set(corners(hv.dataset("val"))) == {(0, 0)}
    v = ImageAdapter(source=src, vflip=True, val_fraction=0.25).dataset("train")
    assert corners(v)[15:] == [(3, 0)] * 15
    assert hv.layout.attrs["hflip"] == 1 and hv.layout.attrs["vflip"] == 1
    # an item is a function of its index (exact resume); the trainer's seeded shuffle mixes them
    assert torch.equal(tr[33]["x"], tr[33]["x"])
    with pytest.raises(IndexError):
        tr[60]


# ----------------------------------------------------------------------------- skimage, options
def test_skimage_patches_are_classes_named_after_their_images():
    import skimage.data

    ad = ImageAdapter(source="skimage", images=["coins", "text"], patch=[16, 24], stride=[16, 24], val_fraction=0)
    lay = ad.layout
    assert lay.shape == (16, 24) and lay.attrs["class_names"] == ["coins", "text"] and lay.num_classes == 2
    coins, text = skimage.data.coins(), skimage.data.text()
    n0 = ((coins.shape[0] - 16) // 16 + 1) * ((coins.shape[1] - 24) // 24 + 1)
    n1 = ((text.shape[0] - 16) // 16 + 1) * ((text.shape[1] - 24) // 24 + 1)
    assert ad.labels.tolist() == [0] * n0 + [1] * n1
    assert np.array_equal(ad.data[1, 0].numpy(), coins[:16, 24:48])  # row-major patches
    with pytest.raises(ImageDataError, match="unknown scikit-image sample image 'lena'; the ones bundled"):
        ImageAdapter(source="skimage", images=["lena"])
    with pytest.raises(ImageDataError, match="set data.options.mode"):
        ImageAdapter(source="skimage", images=["camera", "astronaut"])
    assert ImageAdapter(source="skimage", images=["camera", "astronaut"], mode="L", patch=64).data.shape[1] == 1


def test_every_listed_skimage_image_loads_without_a_network():
    from diffkit_images.adapter import skimage_image

    for name in SKIMAGE_IMAGES:
        a = skimage_image(name)
        assert a.dtype == np.uint8 and a.ndim == 3, name


def test_max_images_takes_a_seeded_subset(digits):
    a = ImageAdapter(max_images=100, val_fraction=0.1)
    assert a.data.shape[0] == 100 and len(a.val_idx) == 10
    assert torch.equal(a.data, ImageAdapter(max_images=100).data)
    assert not torch.equal(a.data, ImageAdapter(max_images=100, seed=5).data)
    with pytest.raises(ImageDataError, match="max_images must be an integer >= 1"):
        ImageAdapter(max_images=0)


def test_split_is_stratified_and_keeps_a_training_item_per_class():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 2)
    tr, va = split_indices(len(labels), labels, 0.1, 0)
    assert len(va) == 8 and np.bincount(labels[va], minlength=3).tolist() == [5, 3, 0]
    assert set(np.unique(labels[tr])) == {0, 1, 2}
    with pytest.raises(ImageDataError, match="too few for a validation split"):
        split_indices(3, np.array([0, 1, 2]), 0.5, 0)  # one image per class: none to spare
    assert split_indices(3, np.array([0, 1, 2]), 0.0, 0)[0].tolist() == [0, 1, 2]


def test_options_are_checked_and_named():
    from diffkit.model import _check_options

    with pytest.raises(ConfigError, match=r"unknown option\(s\) sorce; valid options: source, conditional"):
        _check_options(ImageAdapter, {"sorce": "digits"}, "data.options (adapter 'images')")
    with pytest.raises(ImageDataError, match="patch apply only to source = \"skimage\", and this source is 'digits'"):
        ImageAdapter(patch=16)
    with pytest.raises(ImageDataError, match="key apply only to .npy/.npz sources"):
        ImageAdapter(key="x")
    with pytest.raises(ImageDataError, match=r"range = \[1, 1\] must be finite with hi > lo"):
        ImageAdapter(range=[1, 1])
    with pytest.raises(ImageDataError, match="resize must be one of"):
        ImageAdapter(resize="pad")
    Config(data=DataConfig(adapter="images", options={"source": "digits"}))  # a valid config


def test_layout_survives_the_checkpoint_round_trip(digits):
    lay = Layout.from_dict(digits.layout.to_dict())
    assert lay.num_classes == 10 and lay.attrs == digits.layout.attrs
    assert torch.equal(lay.mean, digits.layout.mean) and torch.equal(lay.std, digits.layout.std)


def test_pixel_classifier_and_class_agreement(tmp_path):
    """The quickstart's and the digits example's score: a classifier on real digits reads the
    held-out real digits well, agrees with true labels and not with shuffled ones."""
    from diffkit_images import ImageAdapter
    from diffkit_images.scoring import class_agreement, pixel_classifier

    ad = ImageAdapter(source="digits", val_fraction=0.2)
    clf, acc = pixel_classifier(ad)
    assert acc > 0.9
    idx = torch.as_tensor(ad.val_idx)
    x, y = ad.data[idx].float().numpy(), ad.labels[idx].numpy()
    np.savez(tmp_path / "s.npz", x=x, labels=y)
    assert class_agreement(clf, tmp_path / "s.npz", (0.0, 16.0)) == pytest.approx(acc)
    np.savez(tmp_path / "t.npz", x=x, labels=(y + 1) % 10)
    assert class_agreement(clf, tmp_path / "t.npz", (0.0, 16.0)) < 0.1
    np.savez(tmp_path / "u.npz", x=x)
    with pytest.raises(ValueError, match="holds no labels"):
        class_agreement(clf, tmp_path / "u.npz", (0.0, 16.0))
