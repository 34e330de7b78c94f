"""The KS assimilation benchmark (issue 15, "KS assimilation benchmark") at its quick setting: every row
(guided AR surrogate, guided window model, universal-amortised model, OI, EnKF with the true simulator)
scored per sparsity with diffkit.ensemble's metrics, the targets printed as PASS/FAIL lines, and the
baselines behaving as their theory says (OI improves with denser observations, guidance beats the
unguided prior).  The DPS row (as costly as the reconstruction row) is left out here (``--zeta 0``)
to keep the test short; docs/bench/assimilation_ks.md has it."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("assimilation_ks", ROOT / "benchmarks" / "assimilation_ks.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("assimilation_ks", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_ks_assimilation_benchmark_quick_setting(tmp_path, capsys):
    bench = _bench()
    md, js = tmp_path / "ks.md", tmp_path / "ks.json"
    res = bench.main(["--setting", "quick", "--zeta", "0", "--workdir", str(tmp_path / "w"), "--markdown", str(md),
                      "--json", str(js), "--no-progress"])
    out = capsys.readouterr().out
    table = res["table"]
    assert set(table) == {str(s) for s in bench.STRIDES}
    for stride, rows in table.items():
        assert set(rows) == set(bench.ROWS) - {"AR + dps"}
        for name, v in rows.items():
            assert all(math.isfinite(v[k]) for k in ("rmse", "crps", "spread_skill")), (stride, name, v)
            assert v["members"] == (32 if name in ("OI", "EnKF") else bench.SETTINGS["quick"]["members"])
    # OI is the linear-Gaussian posterior: denser observations, smaller error; far below the climatology
    oi = [table[str(s)]["OI"]["rmse"] for s in bench.STRIDES]
    assert oi == sorted(oi) and oi[0] < 0.5 * res["clim_std"]
    # guidance uses the observations: the guided rollout beats the same rollout without them
    for s in (4, 8):
        assert table[str(s)]["AR + reconstruction"]["rmse"] < table[str(s)]["AR prior"]["rmse"], s
    # the EnKF inflation was tuned on the validation trajectory over the setting's grid
    for s in bench.STRIDES:
        inf = res["inflation"][s]
        assert inf["best"] in bench.SETTINGS["quick"]["inflation"]
        assert inf["scores"][inf["best"]] == min(v for v in inf["scores"].values() if math.isfinite(v))
    # one PASS/FAIL line per stride and criterion, agreeing with the table
    lines = [ln for ln in out.splitlines() if ln.startswith("target (stride")]
    assert len(lines) == 3 * len(bench.STRIDES) and all(ln.endswith(("PASS", "FAIL")) for ln in lines)
    # the recalibrated rows: the raw row's members with their anomalies scaled by the validation spread
    # scale -- the same ensemble mean (RMSE), the spread (so spread/skill) multiplied by exactly that scale
    for s in bench.STRIDES:
        for r in bench.CALIBRATED:
            raw, cal, k = table[str(s)][r], table[str(s)][f"{r}, calibrated"], res["spread_scale"][s][r]
            assert k > 0 and math.isfinite(k)
            assert cal["rmse"] == pytest.approx(raw["rmse"], rel=1e-9)
            assert cal["spread_skill"] == pytest.approx(k * raw["spread_skill"], rel=1e-9)
    for v in res["targets"]:
        rows = table[str(v["stride"])]
        lo = min(rows[r]["rmse"] for r in bench.DIFFKIT_ROWS if r in rows)
        tied = [r for r in bench.DIFFKIT_ROWS if r in rows and rows[r]["rmse"] <= lo * (1 + 1e-9)]
        best = min(tied, key=lambda r: abs(math.log(rows[r]["spread_skill"])))
        assert v["best"] == best
        if v["what"] == "RMSE / OI":
            assert v["met"] == (rows[best]["rmse"] <= 0.7 * rows["OI"]["rmse"])
    # the RMSE at the observed / unobserved points: the amortised model trained on exact observations imposes
    # them exactly, so at the observed points its ensemble mean scores the observations' own realised noise
    for s in bench.STRIDES:
        rows = table[str(s)]
        for r in ("amortised", "amortised, ddpm", "amortised, calibrated"):
            assert rows[r]["rmse_observed"] == pytest.approx(res["noise_rms"][str(s)], rel=1e-4), (s, r)
        assert all(math.isfinite(v["rmse_unobserved"]) for v in rows.values())
    assert json.loads(js.read_text())["targets"] == res["targets"]
    text = md.read_text()
    assert "| 32 | 1 | EnKF |" in text and text.count("**PASS**") + text.count("**FAIL**") == len(lines)


@pytest.mark.parametrize("argv,fragment", [
    (["--test-seed", "0"], "must differ from each other and from 0"),
    (["--val-seed", "10000"], "must differ from each other"),
    (["--gamma", "0"], "--gamma must be > 0"),
    (["--localisation", "-1"], "--localisation must be a radius > 0"),
])
def test_ks_assimilation_benchmark_bad_options_are_one_line_errors(argv, fragment):
    with pytest.raises(SystemExit) as e:
        _bench().main(["--setting", "quick", *argv])
    msg = str(e.value.code)
    assert fragment in msg and msg.startswith("assimilation_ks.py: error:") and "\n" not in msg
