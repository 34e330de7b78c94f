"""``benchmarks/pde_ks.py --setting quick`` (issue 14 item 2, the KS benchmark with equal effort): the
pipeline runs end to end with few steps (numbers at this size mean little; the cpu setting's are in
docs/benchmarks.md), gives every DDPM noise level as many training samples as the MSE model, and
reports member 0, the ensemble mean, spread/skill, one-step error spectra and PASS/FAIL verdicts."""
from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_pde_ks", ROOT / "benchmarks" / "pde_ks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ks_benchmark_effort_rules():
    """Per-level effort: T x the MSE steps for T uniformly drawn discrete levels; continuous levels or a
    1000-level schedule are refused with one line naming --effort steps; --effort steps is equal steps."""
    bench = _load()
    s = dict(bench.SETTINGS["quick"], steps=50)
    refiner = bench.ddpm_options(SimpleNamespace(recipe="refiner", schedule=None, weighting=None, noise=None,
                                                 sampler=None, spacing=None, nfe=None), s)
    assert refiner["nfe"] == 4 and refiner["noise"] == "uniform_t"
    assert bench.training_steps(SimpleNamespace(effort="per-level"), s, refiner) == (50, 200)
    five = dict(refiner, schedule={"name": "refiner", "steps": 4})
    assert bench.training_steps(SimpleNamespace(effort="per-level"), s, five) == (50, 250)
    assert bench.training_steps(SimpleNamespace(effort="steps"), s, refiner) == (50, 50)
    cosine = bench.ddpm_options(SimpleNamespace(recipe="cosine", schedule=None, weighting=None, noise=None,
                                                sampler=None, spacing=None, nfe=None), s)
    assert cosine["nfe"] == s["nfe"]
    for d, frag in ((cosine, "draws continuous levels: use --effort steps"),
                    (dict(refiner, weighting="vdm"), "use --effort steps"),
                    (dict(refiner, schedule={"name": "linear", "T": 1000}), "1000x the MSE model's steps")):
        with pytest.raises(SystemExit) as e:
            bench.training_steps(SimpleNamespace(effort="per-level"), s, d)
        msg = str(e.value)
        assert frag in msg and "\n" not in msg, msg
    # the expected samples per level of the refiner run: every level as many as the MSE model
    from diffkit.config import config_from_dict

    cfg = config_from_dict({"data": {"adapter": "pde", "options": {"path": "x.nc"}},
                            "model": {"objective": "diffusion", "schedule": "refiner"},
                            "loss": {"weighting": "native", "noise": "uniform_t"}})
    counts = bench.level_counts(cfg, 200, 32)
    assert [c["level"] for c in counts] == ["k = 0 (prediction)", "k = 1 (refinement)", "k = 2 (refinement)",
                                            "k = 3 (refinement)"]
    assert [c["samples"] for c in counts] == [50 * 32] * 4
    assert counts[0]["sigma"] > 1e6 and counts[-1]["sigma"] == pytest.approx(4e-7, rel=1e-3)
    # continuous noise levels: shares per decade of sigma~ sum to 1, centred on the log-normal's mean
    cfg = config_from_dict({"data": {"adapter": "pde", "options": {"path": "x.nc"}},
                            "model": {"objective": "diffusion", "schedule": "cosine"},
                            "loss": {"weighting": "edm", "noise": "lognormal"}})
    counts = bench.level_counts(cfg, 100, 32)
    assert sum(c["fraction"] for c in counts) == pytest.approx(1.0)
    top = max(counts, key=lambda c: c["fraction"])
    assert top["level"] == "sigma~ in [1e-1, 1e0)", top  # log10 sigma~ ~ N(-1.2 / ln 10 = -0.52, ...)


def test_ks_benchmark_band_table_is_the_amplitude_ratio():
    bench = _load()
    k = torch.arange(129, dtype=torch.float64)
    mse = torch.full((129,), 2.0, dtype=torch.float64)
    ddpm = torch.where(k > 32, 8.0, 0.5).double()
    rows = bench.band_table({"k": k, "curves": {"truth": mse, "MSE": mse, "DDPM member 0": ddpm}})
    assert [r["band"] for r in rows] == ["1-4", "5-8", "9-16", "17-32", "33-64", "65-128"]
    assert [r["ratio_member0"] for r in rows] == pytest.approx([0.5] * 4 + [2.0] * 2)
    assert rows[0]["mse"] == pytest.approx(8.0) and rows[-1]["ddpm_member0"] == pytest.approx(64 * 8.0)


@pytest.mark.slow
def test_ks_benchmark_with_equal_effort(tmp_path, capsys):
    bench = _load()
    md, js = tmp_path / "ks.md", tmp_path / "ks.json"
    res = bench.main(["--setting", "quick", "--steps", "10", "--workdir", str(tmp_path / "w"), "--no-progress",
                      "--markdown", str(md), "--json", str(js)])
    out = capsys.readouterr().out
    # equal effort: the DDPM trained T = 4 times the MSE model's steps, as its run records
    assert res["MSE"]["steps"] == 10 and res["DDPM"]["steps"] == 40
    logged = [json.loads(line) for line in (tmp_path / "w" / "run_diffusion_refiner_per-level" / "metrics.jsonl")
              .read_text().splitlines() if line.strip()]
    assert max(r.get("step", 0) for r in logged) == 40
    mse_samples = res["MSE"]["level_counts"][0]["samples"]
    assert mse_samples == 10 * 32
    assert [c["samples"] for c in res["DDPM"]["level_counts"]] == [mse_samples] * 4
    assert "k = 0 (prediction): sigma~ = 3.27e+06, 0.250 of 40 x 32 = 320" in out
    # member 0, ensemble mean, spread/skill over the first half of the ensemble mean's high-corr. time
    D = res["DDPM"]
    hct = D["ensemble_mean_hct_0.8"]["mean"]
    w = D["spread_skill_window"]
    assert w["steps"] == max(1, math.floor(0.5 * hct / D["dt"] + 1e-9)) and w["half_hct"] == pytest.approx(0.5 * hct)
    assert 0 < res["spread_skill_first_half"] < 10 and len(D["spread_skill_per_step"]) == len(D["corr_mean_curve"])
    assert res["ensemble_mean_ratio"]["mean"] == pytest.approx(hct / res["MSE"]["hct_0.8"]["mean"])
    # one-step error spectra: band sums of the written curves, amplitude ratios, a row per band
    sp = res["spectra"]
    k, c = np.asarray(sp["k"]), {n: np.asarray(v) for n, v in sp["curves"].items()}
    for b in sp["bands"]:
        lo, hi = map(int, b["band"].split("-"))
        sel = (k >= lo) & (k <= hi)
        assert b["mse"] == pytest.approx(c["MSE"][sel].sum())
        assert b["ratio_member0"] == pytest.approx(math.sqrt(c["DDPM member 0"][sel].sum() / c["MSE"][sel].sum()))
        assert re.search(rf"^\s+{b['band']}\s.*\s{b['ratio_member0']:.2f}\s", out, re.M), b
    # the verdicts: one line per issue-14 target, PASS exactly when the value meets it
    lines = re.findall(r"^verdict: (.*) = (\S+) \(target (.*)\): (PASS|FAIL)$", out, re.M)
    assert len(lines) == 3 == len(res["targets"])
    for (what, value, target, verdict), t in zip(lines, res["targets"]):
        assert what == t["what"] and float(value) == pytest.approx(t["value"], abs=0.005)
        lo, hi = {"ensemble_mean_ratio": (1.15, math.inf), "member0_ratio": (1.0, math.inf),
                  "spread_skill_first_half": (0.7, 1.3)}[t["key"]]
        assert (verdict == "PASS") == (lo <= t["value"] <= hi)
    assert json.loads(js.read_text())["targets"] == res["targets"]
    text = md.read_text()
    assert "| DDPM | k = 0 (prediction) |" in text and "| target (issue 14) |" in text and "| band m |" in text
    for png in ("ks.png", "ks_spectra.png", "ks_spectra_ratio.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG", png
