"""benchmarks/gpu.py (issue 17): its helpers are right, and ``--smoke`` runs every code path on a CPU.

The smoke run (tiny networks, a few steps, ``torch.compile`` with dynamo's eager backend) checks
the structure of the JSON and the markdown: every training row of the four UNet/DiT variants per
side, both samplers in both modes with equal counted NFE on both sides, the four loss curves of
the accuracy section, and a PASS/FAIL/n/a line for every target.  Its numbers mean nothing.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- helpers ---------------------------------------------------------------------------------
def test_smooth_is_a_trailing_moving_average(gpu):
    assert gpu.smooth([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert gpu.smooth([4.0, 2.0, 0.0], 5) == [4.0, 3.0, 2.0]
    assert gpu.smooth([3.0, 1.0], 1) == [3.0, 1.0]


def test_max_rel_diff(gpu):
    assert gpu.max_rel_diff([1.0, 2.2, 3.0], [1.0, 2.0, 4.0]) == pytest.approx(0.25)
    assert gpu.max_rel_diff([1.0], [1.0]) == 0.0


def test_peak_by_device_name_and_override(gpu):
    assert gpu.device_peak("NVIDIA H200", None)[0] == 797.0
    assert gpu.device_peak("NVIDIA H100 80GB HBM3", None)[0] == 989.0
    assert gpu.device_peak("NVIDIA H100 PCIe", None)[0] == 756.0
    assert gpu.device_peak("NVIDIA H200", 500.0) == (500.0, "--peak-tflops")
    peak, why = gpu.device_peak("x86_64", None)
    assert peak is None and "--peak-tflops" in why


def _row(net, side, sps, dtype="bf16", mode="compile", mfu=None):
    return dict(network=net, side=side, dtype=dtype, mode=mode, samples_per_s=sps, mfu=mfu)


def test_targets_pass_and_fail_at_the_thresholds(gpu):
    res = dict(params={"unet": dict(rel=0.073), "dit": dict(rel=-0.11)},
               training=[_row("dk_unet", "diffkit", 6000.0), _row("df_unet", "diffusers", 3000.0),
                         _row("dk_unet", "diffkit", 9000.0, mode="eager"), _row("dk_dit", "diffkit", 1.0, mfu=0.549)],
               sampling=[dict(sampler="ddim", nfe=50, mode="eager", side=s, samples_per_s=v, nfe_counted=50)
                         for s, v in (("diffkit", 199.0), ("diffusers", 100.0))],
               accuracy=dict(max_rel_diff={"bf16": 0.01, "bf16_compile": 0.03}, noise=0.02, window=20))
    got = {t["name"].split(" (")[0]: t["status"] for t in gpu.targets(res)}
    assert got == {
        "unet parameters within +-10% of diffusers'": "PASS",
        "dit parameters within +-10% of diffusers'": "FAIL",
        "unet bf16+compile throughput >= 2x diffusers'": "PASS",
        "unet bf16+compile throughput >= 5150 img/s": "PASS",
        "dit bf16+compile MFU >= 55%": "FAIL",
        "sampling ddim-50 eager >= 2x diffusers' samples/s": "FAIL",
        "accuracy: bf16 loss curve within the fp32 noise": "PASS",
        "accuracy: bf16_compile loss curve within the fp32 noise": "FAIL",
    }


# -- the smoke run ---------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_run_writes_complete_json_and_markdown(tmp_path):
    md, js = tmp_path / "gpu.md", tmp_path / "gpu.json"
    # one thread, as conftest.py sets for the tests themselves: the tensors are tiny, and on a busy 2-core
    # box torch's two OpenMP threads wait on each other (a 4x15x8x8 conv forward + backward took 5-130 ms
    # instead of ~0.5 ms; smoke runs of 50-535 s instead of ~15)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("DIFFKIT_TEST_THREADS", "1"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--peak-tflops", "1",
                           "--markdown", str(md), "--json", str(js)],
                          capture_output=True, text=True, timeout=1500, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"threads {env['OMP_NUM_THREADS']}, SMOKE" in proc.stdout  # (the header line)
    res = json.loads(js.read_text())
    assert res["smoke"] is True and res["peak_tflops"] == 1.0
    assert set(res["params"]) == {"unet", "dit"}
    for p in res["params"].values():
        assert p["rel"] == pytest.approx(p["diffkit"] / p["diffusers"] - 1)

    tr = res["training"]
    keys = {(r["section"], r["side"], r["dtype"], r["mode"]) for r in tr}
    want = {("unet", s, d, m) for s in ("diffkit", "diffusers") for d, m in
            (("fp32", "eager"), ("bf16", "eager"), ("bf16", "compile"))}
    want |= {("dit", s, "bf16", m) for s in ("diffkit", "diffusers") for m in ("eager", "compile")}
    assert keys == want and len(tr) == len(want)
    for r in tr:
        assert r["samples_per_s"] > 0 and r["gflop_per_step"] > 0
        assert r["samples_per_s"] == pytest.approx(r["batch"] / (r["ms_per_step"] / 1e3))
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.0)  # against the 1 TFLOP/s peak given
        assert r["format"] in (("contiguous", "channels_last") if r["section"] == "unet" else ("-",))

    sa = res["sampling"]
    assert {(s["sampler"], s["mode"], s["side"]) for s in sa} == {
        (n, m, s) for n in ("ddim", "dpmpp_2m") for m in ("eager", "compile") for s in ("diffkit", "diffusers")}
    for s in sa:
        assert s["nfe_counted"] == s["nfe"] == {"ddim": 4, "dpmpp_2m": 3}[s["sampler"]]
        assert s["samples_per_s"] == pytest.approx(s["batch"] / s["s_per_batch"])

    acc = res["accuracy"]
    assert set(acc["curves"]) == {"fp32", "fp32_seed1", "bf16", "bf16_compile"}
    assert all(len(c) == acc["steps"] == 6 and all(math.isfinite(v) for v in c) for c in acc["curves"].values())
    assert acc["noise"] == acc["max_rel_diff"]["fp32_seed1"] > 0  # other noise draws give another curve

    names = [t["name"] for t in res["targets"]]
    assert len(names) == 2 + 2 + 1 + 4 + 2
    assert all(t["status"] in ("PASS", "FAIL", "n/a") for t in res["targets"])
    assert {t["status"] for t in res["targets"] if t["name"].startswith(("unet param", "dit param"))} == {"PASS"}

    text = md.read_text()
    for head in ("## Parameters", "## Training step", "## Sampling", "## Accuracy", "## Targets"):
        assert head in text
    assert len(re.findall(r"^\| unet \| (diffkit|diffusers) \|", text, flags=re.M)) == 6
    assert len(re.findall(r"^\| dit \| (diffkit|diffusers) \|", text, flags=re.M)) == 4
    assert len(re.findall(r"^\| (unet|dit) \| [\d,]+ \| [\d,]+ \| [+-]\d", text, flags=re.M)) == 2  # parameters
    assert text.count("\n| ddim |") == 4 and text.count("\n| dpmpp_2m |") == 4
    assert text.count("\n- **") == len(names)
    for t in res["targets"]:
        assert f"target {t['status']}: {t['name']}" in proc.stdout
