"""``benchmarks/weather_qg.py --setting quick``: the benchmark pipeline runs end to end (numbers at
this size mean little; the cpu setting's are in docs/benchmarks.md), writes its JSON and markdown,
and ``--ddpm-set`` retrains only the DDPM, reusing the data and the finished baseline."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_weather_qg", ROOT / "benchmarks" / "weather_qg.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_weather_benchmark_quick_and_ddpm_override(tmp_path):
    bench = _load()
    work = tmp_path / "w"
    common = ["--setting", "quick", "--workdir", str(work), "--no-progress", "--steps", "60"]
    res = bench.main(common + ["--json", str(tmp_path / "a.json")])
    K = bench.SETTINGS["quick"]["k"]
    for label in ("DDPM", "MSE+perturbed IC"):
        r = res[label]
        assert len(r["crps"]) == len(r["rmse"]) == len(r["spread_skill_ratio"]) == K
        assert np.all(np.isfinite(r["crps"])) and np.all(np.asarray(r["crps"]) > 0)
        assert r["lead_hours"] == [bench.SETTINGS["quick"]["lead"] * (k + 1) for k in range(K)]
    assert res["crps_ratio"] == pytest.approx(list(np.asarray(res["DDPM"]["crps"]) / np.asarray(res["MSE+perturbed IC"]["crps"])))
    assert json.loads((tmp_path / "a.json").read_text())["met"] == res["met"]
    log = (work / "run_regression" / "metrics.jsonl").read_text()

    md = tmp_path / "b.md"
    res2 = bench.main(common + ["--ddpm-set", "loss.weighting=simple", "--markdown", str(md)])
    assert (work / "run_diffusion_loss.weighting=simple").is_dir()
    assert (work / "run_regression" / "metrics.jsonl").read_text() == log   # the baseline was not retrained
    assert res2["MSE+perturbed IC"]["crps"] == res["MSE+perturbed IC"]["crps"]
    assert res2["DDPM"]["crps"] != res["DDPM"]["crps"]
    text = md.read_text()
    assert "DDPM config overrides: `loss.weighting=simple`" in text and "| lead (h) |" in text
    assert (tmp_path / "b_lead_curves_ddpm.png").read_bytes()[:4] == b"\x89PNG"
