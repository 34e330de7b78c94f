"""Checkpoints: round trip of everything a run needs, atomic writes, and clear errors for bad files.

Every bad-file test checks two things: the error names the file and the problem, and nothing
else on disk changed (the previous checkpoints still load, byte for byte).
"""
from __future__ import annotations

import builtins
import errno
import hashlib
import os
import pickle
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import diffkit
from diffkit import checkpoint as ck
from diffkit.checkpoint import (CheckpointManager, capture_rng_state, generator_state, load_checkpoint,
                                restore_rng_state, resume, save_checkpoint, set_generator_state)
from diffkit.errors import CheckpointError, DiffkitError
from diffkit.layout import Layout


# -- helpers ---------------------------------------------------------------------------------
def _sha(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _layout() -> Layout:
    return Layout(
        channels=("t2m", "u10"), spatial=("lat", "lon"), shape=(3, 4), periodic=("lon",),
        coords={"lat": (-45.0, 0.0, 45.0)}, weights=torch.tensor([0.5, 1.0, 0.5]).view(1, 3, 1),
        cond_channels=("orog",), scalars=("year",), num_classes=2,
        mean=torch.tensor([280.0, 1.0]).view(2, 1, 1), std=torch.tensor([10.0, 5.0]).view(2, 1, 1),
        attrs={"units": "K", "scale": 2.5},
    )


def _train_state(steps: int = 1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=2),
              torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)], milestones=[2])
    for _ in range(steps):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _payload(step: int = 1) -> dict:
    model, opt, sched = _train_state()
    return {
        "model": model.state_dict(),
        "ema": {k: v.clone() * 0.5 for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
        "rng": capture_rng_state(),
        "layout": _layout().to_dict(),
        "config": {"model": {"name": "unet", "channels": [32, 64], "dropout": 0.0, "attn": None},
                   "train": {"lr": 1e-2, "ema": 0.999, "amp": False, "shape": (3, 4)},
                   "schedule": "cosine"},
    }


def _assert_same(a, b, where="ckpt"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where


class _Evil:
    """Unpickling this runs code that writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"with open({self.marker!r}, 'w') as f: f.write('x')",))


# -- round trip ------------------------------------------------------------------------------
def test_round_trip_everything(tmp_path):
    payload = _payload(step=7)
    path = save_checkpoint(tmp_path / "run" / "a.pt", payload)
    assert path == tmp_path / "run" / "a.pt" and os.listdir(tmp_path / "run") == ["a.pt"]

    raw = torch.load(path, weights_only=True)  # loadable by plain torch with weights_only
    ckpt = load_checkpoint(path, require=("model", "ema", "optimizer", "scheduler", "step", "rng"))
    assert ckpt["format"] == "diffkit-checkpoint" and ckpt["format_version"] == 1
    assert ckpt["diffkit_version"] == diffkit.__version__ == raw["diffkit_version"]
    for k in payload:
        _assert_same(payload[k], ckpt[k], k)

    layout = Layout.from_dict(ckpt["layout"])
    _assert_same(layout.to_dict(), _layout().to_dict(), "layout")

    # restored optimiser + scheduler continue exactly like the originals
    model, opt, sched = _train_state()
    model2 = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 4))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.1)
    sched2 = torch.optim.lr_scheduler.SequentialLR(
        opt2, [torch.optim.lr_scheduler.LinearLR(opt2, 0.1, total_iters=2),
               torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)], milestones=[2])
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    x = torch.randn(5, 4)
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
        s.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert sched.get_last_lr() == sched2.get_last_lr()

    # a loaded checkpoint can be saved again (the marker is replaced, not duplicated)
    again = load_checkpoint(save_checkpoint(tmp_path / "b.pt", ckpt))
    _assert_same(ckpt, again)


def test_rng_states_repeat_the_same_numbers(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)          # python caches the second normal (gauss_next)
    np.random.randn(1)          # numpy's legacy generator caches one too (has_gauss)
    gen = torch.Generator().manual_seed(4)
    sampler = torch.utils.data.RandomSampler(range(50), generator=gen)
    save_checkpoint(tmp_path / "r.pt", {"rng": capture_rng_state(), "sampler": generator_state(gen)})

    def draw():
        return ([random.random(), random.gauss(0, 1)], np.random.randn(3).tolist(), np.random.rand(2).tolist(),
                torch.rand(4).tolist(), torch.randperm(10).tolist(), list(sampler))

    first = draw()
    ckpt = load_checkpoint(tmp_path / "r.pt")
    restore_rng_state(ckpt["rng"])
    set_generator_state(gen, ckpt["sampler"])
    assert draw() == first
    # a shuffling DataLoader without its own generator draws from the torch CPU RNG
    restore_rng_state(ckpt["rng"])
    order = [b.tolist() for b in torch.utils.data.DataLoader(range(12), batch_size=4, shuffle=True)]
    restore_rng_state(ckpt["rng"])
    assert [b.tolist() for b in torch.utils.data.DataLoader(range(12), batch_size=4, shuffle=True)] == order


def test_rng_state_checks(tmp_path):
    gen = torch.Generator()
    with pytest.raises(CheckpointError, match="cuda generator"):
        set_generator_state(gen, {"device": "cuda:0", "state": torch.zeros(16, dtype=torch.uint8)})
    with pytest.raises(CheckpointError, match="uint8"):
        set_generator_state(gen, {"device": "cpu", "state": [1, 2, 3]})
    with pytest.raises(CheckpointError, match="malformed"):
        restore_rng_state({"python": {"version": 3}})
    if not torch.cuda.is_available():  # a GPU checkpoint resumed on a CPU-only machine
        assert capture_rng_state()["cuda"] == []
        with pytest.warns(UserWarning, match="CUDA RNG states for 2 device.* 0 are available"):
            restore_rng_state({"cuda": [torch.zeros(16, dtype=torch.uint8)] * 2})


# -- truncation, corruption, fallback ----------------------------------------------------------
def test_truncated_at_random_offsets(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", _payload())
    data = good.read_bytes()
    rng = random.Random(0)
    offsets = sorted({0, 1, 3, len(data) - 1, *rng.sample(range(4, len(data) - 1), 17)})
    assert len(offsets) >= 20
    bad = tmp_path / "bad.pt"
    for off in offsets:
        bad.write_bytes(data[:off])
        with pytest.raises(CheckpointError) as ei:
            load_checkpoint(bad)
        msg = str(ei.value)
        assert str(bad) in msg and ("truncated" in msg or "empty" in msg), (off, msg)
        assert "earlier checkpoint" in msg
    assert load_checkpoint(good)["step"] == 1


def test_bit_flip_detected_by_crc(tmp_path):
    marker = torch.full((64,), 1234.5)
    path = save_checkpoint(tmp_path / "c.pt", {"model": {"w": marker}})
    data = bytearray(path.read_bytes())
    i = data.find(marker.numpy().tobytes())
    assert i > 0
    data[i + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt.*CRC"):
        load_checkpoint(path)
    # torch itself does not notice: without the check the damaged tensor loads silently
    assert not torch.equal(load_checkpoint(path, verify=False)["model"]["w"], marker)


def test_latest_valid_falls_back_with_a_warning(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    assert mgr.latest_valid() is None
    assert CheckpointManager(tmp_path / "missing").latest_valid() is None
    p1 = mgr.save(1, {"model": {"w": torch.ones(3)}})
    p2 = mgr.save(2, {"model": {"w": torch.full((3,), 2.0)}})
    p3 = mgr.save(3, {"model": {"w": torch.full((3,), 3.0)}})
    h1 = _sha(p1)
    p3.write_bytes(p3.read_bytes()[: p3.stat().st_size // 2])         # truncated by a crash
    p2.write_text("garbage")                                           # overwritten by something else
    (tmp_path / ".ckpt-000000004.pt.tmp-99999999").write_bytes(b"PK\x03\x04partial")  # crash leftover
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.warns(UserWarning) as rec:
        path, ckpt = mgr.latest_valid(require=("model",))
    assert path == p1 and ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    msgs = [str(w.message) for w in rec]
    assert any("skipping" in m and p3.name in m and "truncated" in m for m in msgs), msgs
    assert any("skipping" in m and p2.name in m and "foreign" in m for m in msgs), msgs
    assert _sha(p1) == h1 and p2.exists() and p3.exists()   # loading never modifies or deletes files

    with pytest.warns(UserWarning, match="skipping"):
        assert resume(tmp_path)[0] == p1
    assert resume(p1)[1]["step"] == 1

    p1.write_bytes(b"")
    with pytest.warns(UserWarning, match="skipping"), pytest.raises(CheckpointError, match="none of the 3"):
        mgr.latest_valid()


# -- foreign and malicious files ---------------------------------------------------------------
def _write_zip(p):
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("a.txt", "hi")


def test_foreign_files(tmp_path):
    cases = {
        "text.pt": lambda p: p.write_text("step: 100\nweights: here\n"),
        "tensor.pt": lambda p: torch.save(torch.zeros(3), p),
        "state_dict.pt": lambda p: torch.save({"weight": torch.zeros(3)}, p),
        "wrong_marker.pt": lambda p: torch.save({"format": "other-tool", "format_version": 1}, p),
        "raw_pickle.pt": lambda p: p.write_bytes(pickle.dumps({"a": 1}, protocol=4)),
        "other.zip": _write_zip,
    }
    for name, make in cases.items():
        p = tmp_path / name
        make(p)
        with pytest.raises(CheckpointError, match="not a diffkit checkpoint .foreign") as ei:
            load_checkpoint(p)
        assert str(p) in str(ei.value), name


@pytest.mark.parametrize("how", ["torch.save", "pickle-2", "pickle-0", "pickle-5"])
def test_code_carrying_pickle_is_refused_and_never_run(tmp_path, how):
    marker = tmp_path / "PWNED"
    evil = _Evil(marker)
    # the payload is real: plain unpickling would run it
    pickle.loads(pickle.dumps(evil))
    assert marker.exists()
    marker.unlink()

    p = tmp_path / "ckpt-000000002.pt"
    if how == "torch.save":
        torch.save({"format": "diffkit-checkpoint", "format_version": 1, "model": evil}, p)
    else:
        p.write_bytes(pickle.dumps(evil, protocol=int(how[-1])))
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(p)
    assert str(p) in str(ei.value)
    if how in ("torch.save", "pickle-2", "pickle-0"):
        assert "refuses to unpickle" in str(ei.value) and "exec" in str(ei.value)
    assert not marker.exists()

    # in a run directory it is skipped like any bad file
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": {}})
    with pytest.warns(UserWarning, match="skipping"):
        assert mgr.latest_valid()[1]["step"] == 1
    assert not marker.exists()


# -- writing failures: disk full, fsync, rename, interrupt -----------------------------------
def _fail_torch_save(monkeypatch):
    def save(obj, f, *a, **k):
        f.write(b"PK\x03\x04" + b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ck.torch, "save", save)


def _fail_fsync(monkeypatch):
    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(ck.os, "fsync", fsync)


def _fail_replace(monkeypatch):
    def replace(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(ck.os, "replace", replace)


@pytest.mark.parametrize("fail, why", [(_fail_torch_save, "No space left"), (_fail_fsync, "Input/output"),
                                       (_fail_replace, "cross-device")])
def test_failed_write_leaves_previous_checkpoints_untouched(tmp_path, monkeypatch, fail, why):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    p1 = mgr.save(1, _payload(step=1))
    h1 = _sha(p1)
    with monkeypatch.context() as m:
        fail(m)
        with pytest.raises(CheckpointError, match=f"could not write checkpoint .*{why}.*previous checkpoints are untouched"):
            mgr.save(2, _payload(step=2))
        # the same on top of an existing file: it keeps its old content
        with pytest.raises(CheckpointError):
            save_checkpoint(p1, {"model": {}})
    assert sorted(os.listdir(tmp_path)) == [p1.name]          # no partial file, no temp file
    assert _sha(p1) == h1 and load_checkpoint(p1)["step"] == 1
    assert mgr.save(2, _payload(step=2)).exists() and not p1.exists()   # the next save works and prunes


def test_interrupt_during_write_cleans_up(tmp_path, monkeypatch):
    def save(obj, f, *a, **k):
        f.write(b"PK")
        raise KeyboardInterrupt
    monkeypatch.setattr(ck.torch, "save", save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "x.pt", {"a": 1})
    assert os.listdir(tmp_path) == []


def test_unsupported_payload_is_rejected_before_writing(tmp_path):
    p = save_checkpoint(tmp_path / "x.pt", {"step": 1})
    h = _sha(p)
    for bad, what in [({"a": np.zeros(3)}, "numpy.ndarray.*torch.from_numpy"),
                      ({"cfg": {"f": lambda x: x}}, r"payload\['cfg'\]\['f'\] is a .*function"),
                      ({"layout": _layout()}, "Layout.*to_dict"),
                      ({"n": np.float32(1.0)}, r"\.item\(\)")]:
        with pytest.raises(CheckpointError, match=what):
            save_checkpoint(p, bad)
    assert os.listdir(tmp_path) == ["x.pt"] and _sha(p) == h


# -- keep_last, temp files -----------------------------------------------------------------------
def test_keep_last(tmp_path):
    others = ["notes.txt", "ckpt-latest.pt", "other-000000001.pt", "ckpt-000000001.pt.bak"]
    for n in others:
        (tmp_path / n).write_text("x")
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for s in range(1, 6):
        mgr.save(s, {"step": s, "w": torch.tensor(float(s))})
    assert [s for s, _ in mgr.list()] == [4, 5]
    assert [p.name for _, p in mgr.list()] == ["ckpt-000000004.pt", "ckpt-000000005.pt"]
    assert all((tmp_path / n).exists() for n in others)
    # an older step saved after newer ones is still kept: the file just written is never deleted
    mgr.save(3, {"w": torch.tensor(3.0)})
    assert [s for s, _ in mgr.list()] == [3, 4, 5]
    mgr.save(6, {})
    assert [s for s, _ in mgr.list()] == [5, 6]
    assert CheckpointManager(tmp_path, keep_last=None, prefix="other").list()[0][0] == 1
    with pytest.raises(ValueError, match="differs"):
        mgr.save(7, {"step": 8})
    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, keep_last=0)


def test_stale_temp_files_are_removed_on_save(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ckpt-000000004.pt.tmp-{dead.pid}"
    mine = tmp_path / f".ckpt-000000005.pt.tmp-{os.getpid()}"   # a live writer's temp file stays
    for p in (stale, mine):
        p.write_bytes(b"PK\x03\x04")
    mgr = CheckpointManager(tmp_path)
    assert mgr.list() == []
    mgr.save(1, {})
    if os.name == "posix":
        assert not stale.exists()
    assert mine.exists() and [s for s, _ in mgr.list()] == [1]


# -- version, required keys, other errors ---------------------------------------------------------
def test_newer_and_unreadable_format_versions(tmp_path):
    p = tmp_path / "new.pt"
    torch.save({"format": "diffkit-checkpoint", "format_version": 2, "diffkit_version": "9.0.0",
                "model": {}}, p)
    with pytest.raises(CheckpointError, match=r"newer diffkit \(9\.0\.0, format 2\).*upgrade diffkit"):
        load_checkpoint(p)
    torch.save({"format": "diffkit-checkpoint", "format_version": 0, "diffkit_version": "0.0.1"}, p)
    with pytest.raises(CheckpointError, match="no longer reads"):
        load_checkpoint(p)
    torch.save({"format": "diffkit-checkpoint", "format_version": "1"}, p)
    with pytest.raises(CheckpointError, match="invalid format_version"):
        load_checkpoint(p)


def test_require_names_missing_keys(tmp_path):
    p = save_checkpoint(tmp_path / "s.pt", {"model": {"w": torch.ones(1)}, "layout": _layout().to_dict()})
    assert set(load_checkpoint(p, require=("model", "layout"))) >= {"model", "layout"}
    with pytest.raises(CheckpointError, match=r"lacks the required entries \['optimizer', 'step'\]") as ei:
        load_checkpoint(p, require=("model", "optimizer", "step"))
    assert str(p) in str(ei.value) and "'layout'" in str(ei.value)


def test_missing_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    assert issubclass(CheckpointError, DiffkitError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_map_location_is_not_called_corrupt(tmp_path):
    p = save_checkpoint(tmp_path / "g.pt", {"w": torch.ones(2)})
    with pytest.raises(CheckpointError, match="map_location='cuda'.*the file is fine"):
        load_checkpoint(p, map_location="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_and_map_location(tmp_path):
    torch.cuda.manual_seed_all(5)
    p = save_checkpoint(tmp_path / "g.pt", {"rng": capture_rng_state(), "w": torch.ones(2, device="cuda")})
    assert len(load_checkpoint(p)["rng"]["cuda"]) == torch.cuda.device_count()
    first = torch.rand(4, device="cuda").tolist()
    restore_rng_state(load_checkpoint(p)["rng"])
    assert torch.rand(4, device="cuda").tolist() == first
    assert load_checkpoint(p)["w"].device.type == "cpu"
    assert load_checkpoint(p, map_location="cuda")["w"].device.type == "cuda"
