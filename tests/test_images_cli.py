"""End to end through the command line: ``diffkit train`` a class-conditional UNet on the digits,
then ``diffkit sample`` with and without guidance, one class or all (a short run: the point is
the plumbing -- labels, guidance, files -- not the quality, which tests/test_images_examples.py
checks)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from diffkit.cli import main

CONFIG = """
run_dir = "{run}"
[data]
adapter = "images"
options = {{ source = "digits", max_images = 600 }}
batch_size = 32
[model]
backbone = "unet"
options = {{ channels = 16, channel_mult = [1, 2], num_res_blocks = 1, attn_levels = [], mid_attn = false }}
[loss]
p_uncond = 0.2
[trainer]
steps = 30
lr = 2e-3
warmup = 5
log_every = 10
val_every = 0
ckpt_every = 0
snapshot_every = 30
[sample]
n = 10
nfe = 6
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("images_cli")
    cfg = d / "digits.toml"
    cfg.write_text(CONFIG.format(run=(d / "run").as_posix()))
    assert main(["train", str(cfg), "--no-progress"]) == 0
    return d / "run"


def _sample(run, out, *extra):
    assert main(["sample", str(run), "--n", "20", "--seed", "3", "--no-progress", "--out", str(out), *extra]) == 0
    return np.load(out.with_suffix(".npz"), allow_pickle=False)


def test_training_snapshot_is_a_labelled_grid(run):
    snaps = sorted((run / "snapshots").iterdir())
    assert [p.suffix for p in snaps] == [".npz", ".png"]
    z = np.load(snaps[0], allow_pickle=False)
    assert z["labels"].tolist() == list(range(10)) and z["x"].shape == (10, 1, 8, 8)
    assert snaps[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_with_guidance_writes_png_and_npz_with_balanced_labels(run, tmp_path):
    from PIL import Image

    z = _sample(run, tmp_path / "g2.png", "--guidance", "2")
    assert (tmp_path / "g2.png").exists()
    assert z["x"].shape == (20, 1, 8, 8) and np.isfinite(z["x"]).all()
    assert z["labels"].tolist() == [k % 10 for k in range(20)]  # a balanced grid: two per class
    assert z["class_names"].tolist() == [str(k) for k in range(10)]
    meta = json.loads(str(z["attrs"]))
    assert meta["guidance"] == 2.0 and meta["range"] == [0.0, 16.0] and meta["sampler"] == "dpmpp_2m"
    # the PNG shows the samples clamped to the declared range 0..16
    clamped = np.clip(z["x"], 0.0, 16.0)
    assert clamped.min() >= 0 and clamped.max() <= 16
    assert np.abs(z["pixels"].transpose(0, 3, 1, 2) / 255.0 * 16.0 - clamped).max() <= 16.0 / 510 + 1e-6
    img = Image.open(tmp_path / "g2.png")
    assert img.mode == "L" and img.size[1] == 2 + 10 * (64 + 2)  # one row of 64-pixel cells per class


def test_guidance_changes_the_samples_and_one_is_the_conditional_model(run, tmp_path):
    g1 = _sample(run, tmp_path / "g1.png", "--guidance", "1")["x"]
    plain = _sample(run, tmp_path / "plain.png")["x"]
    g3 = _sample(run, tmp_path / "g3.png", "--guidance", "3")["x"]
    assert np.array_equal(g1, plain)  # w = 1 is the conditional model, without the extra pass
    assert np.abs(g3 - plain).max() > 1e-3


def test_label_picks_one_class_and_a_bad_label_is_named(run, tmp_path, capsys):
    z = _sample(run, tmp_path / "three.png", "--label", "3", "--guidance", "2")
    assert z["labels"].tolist() == [3] * 20
    rc = main(["sample", str(run), "--label", "10", "--no-progress", "--out", str(tmp_path / "bad.png")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "--label 10 is not a class of this model: use 0..9" in err and "9: 9" not in err
    assert not (tmp_path / "bad.png").exists()
