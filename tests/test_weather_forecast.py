"""Ensemble weather forecasts (``diffkit_weather.forecast`` / ``evaluate`` / ``plots``) and the
``diffkit forecast`` / ``diffkit evaluate`` commands.

- oracles: a synthetic global file (two variables on two pressure levels, latitude descending like
  ERA5, "hours since" times, a polar row always missing in one variable) whose one-step map is a
  zonal shift by one grid point; backbones that implement it exactly must give exact forecasts,
  as a Regressor and as an x0 Denoiser with deterministic samplers, with the forcings of each
  step's init time and the mask channel of the adapter;
- a tiny trained UNet: seeded, batched ensembles and the CF layout of the forecast file;
- (evaluate's scores against direct metric calls, and the truth's alignment and coverage, on the same
  oracle file -- tests/_weather_shift.py -- are in test_weather_evaluate.py and test_weather_truth.py;
  the conversion of old checkpoint layouts in test_weather_decode.py)
- the commands end to end on NCL's storm files (or a small QG run where they are not installed).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    from diffkit_weather import adapter as A
except ImportError:  # editable install made before the plugin existed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    from diffkit_weather import adapter as A

import xarray as xr  # a dependency: missing it is a failure, not a skip

from diffkit.checkpoint import capture_rng_state, restore_rng_state  # noqa: E402
from diffkit.cli import main  # noqa: E402
from diffkit.config import config_from_dict  # noqa: E402
from diffkit.denoiser import Cond, Denoiser, Regressor  # noqa: E402
from diffkit.schedules import cosine  # noqa: E402
from diffkit_weather import decode as D  # noqa: E402
from diffkit_weather import evaluate as E  # noqa: E402
from diffkit_weather import forecast as F  # noqa: E402

from _tiny_unet import TINY_UNET, TINY_UNET_TOML  # noqa: E402
from _weather_shift import LAT, LEVELS, ShiftOracle, _close_nan, truth_model  # noqa: E402  (shift: conftest.py)

NCL = Path("/usr/share/ncarg/data/cdf")
STORM = [NCL / "Ustorm.cdf", NCL / "Pstorm.cdf"]
STORM_UNITS = "hours since 1996-01-05 00:00"

# ============================================================================= 1. oracles
@pytest.mark.parametrize("history,target,static", [(1, "state", ()), (2, "residual", ("orog",))])
def test_regressor_oracle_forecast_is_exact_and_unstacks_to_the_file(shift, history, target, static, tmp_path):
    a = A.GriddedAdapter(str(shift), history=history, target=target, val_fraction=0.25, static=list(static))
    L = a.layout
    assert L.channels == ("t@500", "t@850", "z@500", "z@850") and L.cond_channels[-1] == "mask"
    assert L.cond_channels[-1 - len(static):-1] == static
    net = ShiftOracle(L)
    model = Regressor(net, L)
    # the oracle maps training items to their targets: items and forecasts share one convention
    for k in (0, 7):
        it = a.dataset("train")[k]
        y = model(Cond(fields=it["fields"][None], scalars=it["scalars"][None]))
        w = it["weight"][None] > 0
        torch.testing.assert_close(y[w], it["x"][None][w], atol=1e-4, rtol=0)
    net.seen.clear()
    ist = F.initial_states(str(shift), L, ["2000-01-02T00:00", "2000-01-03T06:00"])
    i0 = np.array([4, 9])
    np.testing.assert_array_equal(ist.times, np.array(["2000-01-02T00", "2000-01-03T06"], "datetime64[ns]"))
    assert ist.history.shape == (2, history, 4, 8, 24) and ist.mask.shape == (4, 8, 24)
    assert bool(ist.mask[2:, -1].all()) and int(ist.mask.sum()) == 2 * 24      # z's polar row (north = last)
    K, M = 6, 2
    pred = F.forecast(model, None, ist, steps=K, members=M, perturb=0.0)
    assert pred.shape == (2, M, K, 4, 8, 24) and pred.dtype == torch.float32
    # one batched call per step, all inits and members at once
    assert [s[0] for s in net.seen] == [2 * M] * K
    truth = truth_model(i0, K)
    for m in range(M):
        _close_nan(pred[:, m].numpy(), truth)
    # the first step sees exactly the conditioning of the adapter's training items for these init times
    d = a.dataset("train")
    items = [d[int(np.flatnonzero(d.pairs[:, -2] == i)[0])] for i in i0]
    torch.testing.assert_close(net.seen[0][2], torch.stack([it["fields"] for it in items]).repeat_interleave(M, 0),
                               atol=1e-6, rtol=0)
    # forcings of each step's own init time t + k * lead, as the adapter computes them for training
    for k, (_, sc, f) in enumerate(net.seen):
        want = a._scalars[i0 + k].repeat_interleave(M, 0)
        torch.testing.assert_close(sc, want, atol=1e-6, rtol=0)
        mask = f[:, -1]
        assert bool((mask[:, -1] == 0).all()) and bool((mask[:, :-1] == 1).all())   # the adapter's mask channel
    # CF dataset on the file's grid: names, levels, orientation, attributes, valid times
    ds = D.forecast_dataset(pred, L, ist.times, attrs={"seed": 0})
    raw = xr.open_dataset(shift)
    assert ds["t"].dims == ("member", "init_time", "lead_time", "level", "latitude", "longitude")
    np.testing.assert_array_equal(ds["latitude"].values, LAT)
    np.testing.assert_array_equal(ds["level"].values, LEVELS)
    assert ds["z"].attrs == raw["z"].attrs and ds["level"].attrs["units"] == "hPa"
    assert list(ds["lead_time"].values) == [np.timedelta64(6 * (k + 1), "h") for k in range(K)]
    np.testing.assert_array_equal(ds["valid_time"].values, raw["time"].values[i0[:, None] + 1 + np.arange(K)])
    assert ds["member"].attrs["standard_name"] == "realization"
    assert ds["init_time"].attrs["standard_name"] == "forecast_reference_time"
    assert ds["lead_time"].attrs["standard_name"] == "forecast_period"
    for v in ("t", "z"):
        for n in range(2):
            ref = raw[v].values[i0[n] + 1: i0[n] + K + 1]
            _close_nan(ds[v].values[1, n], ref)
    # the netCDF round trip keeps it (lead times as timedeltas)
    from diffkit.adapters import atomic_to_netcdf

    back = E.open_forecast(atomic_to_netcdf(ds, tmp_path / "fc.nc"))
    assert back["lead_time"].dtype.kind == "m" and back.attrs["members"] == M
    _close_nan(back["z"].values, ds["z"].values, atol=0)


def test_perturbed_initial_condition_ensemble_of_a_regression_model(shift):
    a = A.GriddedAdapter(str(shift), val_fraction=0.25)
    L = a.layout
    model = Regressor(ShiftOracle(L), L)
    ist = F.initial_states(shift, L, "2000-01-02T00:00,2000-01-02T12:00")
    p = F.forecast(model, None, ist, steps=2, members=3)              # default: perturb 0.05 (regression, M > 1)
    q = F.forecast(model, None, ist, steps=2, members=3)
    r = F.forecast(model, None, ist, steps=2, members=3, seed=1)
    assert torch.equal(p.nan_to_num(), q.nan_to_num()) and not torch.equal(p.nan_to_num(), r.nan_to_num())
    ss = torch.tensor(L.autoregressive.state_std).reshape(1, 1, 1, 4, 1, 1)
    err = (p - torch.from_numpy(truth_model(np.array([4, 6]), 2))[:, None]) / ss
    fin = torch.isfinite(err)
    assert 0.045 < float(err[fin].std()) < 0.055                     # noise of std 0.05 * the climate std
    assert (p[:, 0] - p[:, 1]).abs().nan_to_num().max() > 1e-3
    # the same noise field on every history state, then the shift: member errors are shifted copies
    torch.testing.assert_close(torch.roll(err[:, :, 0], 1, dims=-1), err[:, :, 1], atol=1e-4, rtol=0,
                               equal_nan=True)
    one = F.forecast(model, None, ist, steps=2, members=1)            # one member: no perturbation
    _close_nan(one[:, 0].numpy(), truth_model(np.array([4, 6]), 2))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_denoiser_oracle_forecast_is_exact_with_deterministic_samplers(shift, sampler):
    a = A.GriddedAdapter(str(shift), history=2, target="residual", val_fraction=0.25)
    L = a.layout
    den = Denoiser(ShiftOracle(L), cosine(), "x0", L)
    ist = F.initial_states(shift, L, ["2000-01-02T06:00", "2000-01-04T00:00"])
    pred = F.forecast(den, None, ist, steps=4, members=3, sampler=sampler, nfe=3, seed=5)
    _close_nan(pred[:, 0].numpy(), truth_model(np.array([5, 12]), 4))
    assert torch.equal(pred[:, 0].nan_to_num(), pred[:, 1].nan_to_num())
    assert torch.equal(pred[:, 0].nan_to_num(), pred[:, 2].nan_to_num())


def test_initial_state_errors_name_times_and_grids(shift, tmp_path):
    L = A.GriddedAdapter(str(shift), history=2, val_fraction=0.25).layout
    near = "2000-01-01 18:00, 2000-01-02 00:00, 2000-01-02 06:00"
    with pytest.raises(A.WeatherDataError, match=rf"2000-01-02 01:00 is not a time of the data .* nearest available "
                                                 rf"times are {near}"):
        F.initial_states(shift, L, "2000-01-02T01:00")
    with pytest.raises(A.WeatherDataError, match=r"needs 2 history state.*first init time with a full history is "
                                                 r"2000-01-01 06:00"):
        F.initial_states(shift, L, "2000-01-01T00:00")
    with pytest.raises(A.WeatherDataError, match="not an ISO time"):
        F.initial_states(shift, L, "yesterday")
    # another grid, a missing variable
    raw = xr.open_dataset(shift)
    raw.isel(latitude=slice(0, 6)).to_netcdf(tmp_path / "small.nc")
    with pytest.raises(A.WeatherDataError, match=r"grids differ: latitude of small.nc has 6 values .* the "
                                                 r"checkpoint layout has 8"):
        F.initial_states(tmp_path / "small.nc", L, "2000-01-02T00:00")
    raw[["t"]].to_netcdf(tmp_path / "t_only.nc")
    with pytest.raises(A.WeatherDataError, match=r"\['z'\] of the checkpoint layout are not in t_only.nc"):
        F.initial_states(tmp_path / "t_only.nc", L, "2000-01-02T00:00")
    # all-val: every init whose history and valid times are all after the training period
    idx = F.select_init_times(A.GriddedAdapter(str(shift), history=2, val_fraction=0.25).times, L, "all-val", steps=2)
    assert idx.tolist() == [22, 23, 24, 25]                           # training times are 0 .. 20


# ============================================================================= 2. a trained model
@pytest.fixture(scope="module")
def trained(shift, tmp_path_factory):
    from diffkit.train import Trainer

    root = tmp_path_factory.mktemp("trained")
    runs = {}
    state = capture_rng_state(cuda=False)
    try:
        for objective in ("diffusion", "regression"):
            cfg = config_from_dict({
                "run_dir": str(root / objective),
                "data": {"adapter": "weather", "batch_size": 8, "val_fraction": 0.25,
                         "options": {"path": str(shift), "history": 1}},
                "model": {"backbone": "unet", "objective": objective, "options": TINY_UNET},
                "trainer": {"steps": 10, "lr": 1e-3, "warmup": 1, "val_every": 0, "ckpt_every": 0, "log_every": 100},
                "sample": {"sampler": "dpmpp_2m", "nfe": 2},
            })
            assert Trainer(cfg, device="cpu", progress=False).fit()["step"] == 10
            runs[objective] = root / objective
    finally:
        restore_rng_state(state)
    return runs


def test_trained_diffusion_ensembles_are_seeded_and_batched(trained, shift):
    fc = F.load_forecaster(trained["diffusion"], device="cpu")
    assert fc.objective == "diffusion" and fc.data_options["history"] == 1
    ist = F.initial_states(shift, fc.layout, "all-val", steps=2, options=fc.data_options)
    N = len(ist.times)
    assert N == 5 and ist.times[0] == np.datetime64("2000-01-06T06:00")
    batches = []
    hook = fc.model.net.register_forward_hook(lambda mod, inp, out: batches.append(inp[0].shape[0]))
    try:
        a = F.forecast(fc, None, ist, steps=2, members=3, seed=0)
    finally:
        hook.remove()
    assert batches == [N * 3] * 4                                     # 2 steps x nfe 2, one batch each
    b = F.forecast(fc, None, ist, steps=2, members=3, seed=0)
    c = F.forecast(fc, None, ist, steps=2, members=3, seed=1)
    assert a.shape == (N, 3, 2, 4, 8, 24)
    assert torch.equal(a.nan_to_num(), b.nan_to_num()) and (a - c).abs().nan_to_num().max() > 1e-3
    assert (a[:, 0] - a[:, 1]).abs().nan_to_num().amax() > 1e-3      # members differ
    assert bool(torch.isnan(a[:, :, :, 2:, -1]).all()) and bool(torch.isfinite(a[:, :, :, :, :-1]).all())
    ds = D.forecast_dataset(a, fc.layout, ist.times, options=fc.data_options)
    assert dict(ds.sizes) == {"member": 3, "init_time": N, "lead_time": 2, "level": 2, "latitude": 8, "longitude": 24}
    np.testing.assert_array_equal(ds["valid_time"].values[:, 1], ist.times + np.timedelta64(12, "h"))


def test_trained_regression_baseline_is_a_perturbed_initial_condition_ensemble(trained, shift):
    fc = F.load_forecaster(trained["regression"], device="cpu")
    assert fc.objective == "regression" and isinstance(fc.model, Regressor)
    ist = F.initial_states(shift, fc.layout, "2000-01-06T06:00,2000-01-06T12:00", options=fc.data_options)
    p = F.forecast(fc, None, ist, steps=3, members=3, seed=0)           # default perturb 0.05
    assert bool(torch.isfinite(p[:, :, :, :, :-1]).all())
    assert (p[:, 0] - p[:, 1]).abs().nan_to_num().amax() > 1e-4
    assert torch.equal(p.nan_to_num(), F.forecast(fc, None, ist, steps=3, members=3, seed=0).nan_to_num())
    q = F.forecast(fc, None, ist, steps=3, members=3, perturb=0.0)     # no perturbation: identical members
    assert torch.equal(q[:, 0].nan_to_num(), q[:, 1].nan_to_num()) and torch.equal(q[:, 0].nan_to_num(),
                                                                                   q[:, 2].nan_to_num())
    assert (q[0, 0, 1:] - q[0, 0, :-1]).abs().nan_to_num().max() > 0  # it does advance
    with pytest.raises(ValueError, match="perturb must be >= 0"):
        F.forecast(fc, None, ist, steps=1, members=2, perturb=-1.0)


# ============================================================================= 4. the commands
def _toml(run: Path, files: list, options: str) -> str:
    paths = ", ".join(f'"{p}"' for p in files)
    return f"""\
run_dir = "{run}"
[data]
adapter = "weather"
batch_size = 8
val_fraction = 0.1
[data.options]
path = [{paths}]
{options}
{TINY_UNET_TOML}
[trainer]
steps = 10
warmup = 1
val_every = 0
ckpt_every = 0
[sample]
sampler = "dpmpp_2m"
nfe = 2
"""


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """A model trained by ``diffkit train`` on NCL's storm u and p (or on a small QG run)."""
    root = tmp_path_factory.mktemp("cli")
    if STORM[0].exists():
        case = dict(files=[str(p) for p in STORM], options=f'time_units = "{STORM_UNITS}"',
                    inits="1996-01-06T00:00,1996-01-07T06:00", bad="1996-01-06T01:00",
                    near="1996-01-05 18:00, 1996-01-06 00:00, 1996-01-06 06:00", n_val=4, channels=["u", "p"],
                    time_dim="timestep", keep=60)
    else:
        qg = root / "qg.nc"
        assert main(["data", "weather", "qg", "--years", "0.02", "--spin-up-years", "0.01", "--nx", "16",
                     "--out", str(qg), "--no-progress", "--device", "cpu"]) == 0
        case = dict(files=[str(qg)], options='variables = ["potential_vorticity"]',
                    inits="2000-01-02T00:00,2000-01-03T06:00", bad="2000-01-02T01:00",
                    near="2000-01-01 18:00, 2000-01-02 00:00, 2000-01-02 06:00", n_val=1,
                    channels=["potential_vorticity@1", "potential_vorticity@2"], time_dim="time", keep=26)
    (root / "cfg.toml").write_text(_toml(root / "run", case["files"], case["options"]))
    state = capture_rng_state(cuda=False)
    try:
        assert main(["train", str(root / "cfg.toml"), "--no-progress", "--device", "cpu"]) == 0
    finally:
        restore_rng_state(state)
    case.update(root=root, run=root / "run")
    return case


@pytest.mark.slow
def test_cli_forecast_and_evaluate_end_to_end(cli, capsys):
    root, files = cli["root"], cli["files"]
    fc = root / "fc.nc"
    capsys.readouterr()
    rc = main(["forecast", str(cli["run"]), "--data", *files, "--init", cli["inits"], "--members", "3", "--steps", "2",
               "--out", str(fc), "--seed", "4", "--no-progress", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "3 member(s) x 2 init time(s) x 2 step(s)" in out
    with xr.open_dataset(fc) as ds:
        ds.load()
    assert ds.sizes["member"] == 3 and ds.sizes["init_time"] == 2 and ds.sizes["lead_time"] == 2
    assert ds.attrs["seed"] == 4 and ds.attrs["sampler"] == "dpmpp_2m" and ds.attrs["members"] == 3
    assert ds.attrs["checkpoint"] == str(cli["run"]) and "--init" in ds.attrs["command"]
    # --spread-scale: the same seed's members, anomalies about the ensemble mean doubled, recorded
    fc2 = root / "fc_x2.nc"
    assert main(["forecast", str(cli["run"]), "--data", *files, "--init", cli["inits"], "--members", "3", "--steps",
                 "2", "--out", str(fc2), "--seed", "4", "--spread-scale", "2", "--no-progress", "--device", "cpu"]) == 0
    with xr.open_dataset(fc2) as d2:
        assert d2.attrs["spread_scale"] == 2.0 and "--spread-scale 2.0" in d2.attrs["command"]
        for v in cli["channels"][:1]:
            name = v.split("@")[0]
            x = ds[name].values.astype(np.float64)
            m = x.mean(0, keepdims=True)
            np.testing.assert_allclose(d2[name].values, m + 2 * (x - m), rtol=1e-5, atol=1e-3)
    capsys.readouterr()
    ev = root / "ev"
    assert main(["evaluate", str(fc), "--truth", *files, "--out", str(ev)]) == 0
    out = capsys.readouterr().out
    assert "3 member(s), 2 init time(s), 2 lead time(s)" in out and "spread/skill" in out
    for ch in cli["channels"]:
        assert any(line.startswith(ch) for line in out.splitlines())
    assert {"scores.csv", "scores.nc", "lead_curves.png", "rank_histograms.png"} <= {p.name for p in ev.iterdir()}
    assert len(list(ev.glob("maps_*.png"))) == len(cli["channels"])
    # all-val: every validation init with history and truth; --no-plots writes the tables only
    rc = main(["forecast", str(cli["run"]), "--data", *files, "--init", "all-val", "--members", "2", "--steps", "2",
               "--out", str(root / "val.nc"), "--no-progress", "--device", "cpu"])
    assert rc == 0
    with xr.open_dataset(root / "val.nc") as ds:
        assert ds.sizes["init_time"] == cli["n_val"]
    assert main(["evaluate", str(root / "val.nc"), "--truth", *files, "--out", str(root / "ev2"), "--no-plots"]) == 0
    assert sorted(p.name for p in (root / "ev2").iterdir()) == ["scores.csv", "scores.nc"]


def test_evaluate_prints_calibration_verdict(cli, capsys):
    """issue 14 item 3: `diffkit evaluate` prints the rank histogram and a dispersion verdict per channel, the
    verdict of diffkit.ensemble.dispersion_verdict on the scores it wrote."""
    from diffkit.ensemble import dispersion_verdict, rank_summary

    root, files = cli["root"], cli["files"]
    fc, ev = root / "cal_fc.nc", root / "cal_ev"
    assert main(["forecast", str(cli["run"]), "--data", *files, "--init", cli["inits"], "--members", "3", "--steps",
                 "2", "--out", str(fc), "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(fc), "--truth", *files, "--out", str(ev), "--no-plots"]) == 0
    out = capsys.readouterr().out
    sc = E.open_scores(ev / "scores.nc")
    lines = out.splitlines()
    assert any(line.startswith("calibration (spread/skill per lead") for line in lines)
    for c, ch in enumerate(cli["channels"]):
        d = dispersion_verdict(sc["spread_skill_ratio"].values[c], sc["rank_histogram"].values[c])
        assert d.verdict in ("under-dispersive", "well-dispersed", "over-dispersive")
        assert f"{ch:<16} verdict: {d}" in lines
        rel, _ = rank_summary(sc["rank_histogram"].values[c])
        assert f"{ch:<16} rank histogram / uniform: {' '.join(f'{x:.2f}' for x in rel)}" in lines
        assert E.summarise(sc)[ch]["dispersion"] == d.verdict


def test_cli_errors_are_one_line(cli, capsys, shift):
    root, files, run = cli["root"], cli["files"], str(cli["run"])
    base = ["--members", "2", "--steps", "2", "--no-progress", "--device", "cpu"]
    capsys.readouterr()
    assert main(["forecast", run, "--data", *files, "--init", cli["bad"], "--out", str(root / "x.nc"), *base]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("diffkit forecast: error:")
    assert "not a time of the data" in err and f"nearest available times are {cli['near']}" in err
    assert not (root / "x.nc").exists()
    # the data on another grid than the checkpoint's
    assert main(["forecast", run, "--data", str(shift), "--init", "2000-01-02T00:00", "--out", str(root / "x.nc"),
                 *base]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "grids differ" in err and "shift.nc" in err and "checkpoint" in err
    # a truth that ends before the last valid time
    assert main(["forecast", run, "--data", *files, "--init", "all-val", "--out", str(root / "v.nc"), *base]) == 0
    short = []
    for f in files:
        with xr.open_dataset(f, decode_times=False) as ds:
            p = root / f"short_{Path(f).name}"
            ds.isel({cli["time_dim"]: slice(0, cli["keep"])}).to_netcdf(p)
            short.append(str(p))
    capsys.readouterr()
    assert main(["evaluate", str(root / "v.nc"), "--truth", *short, "--out", str(root / "ev3")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("diffkit evaluate: error:")
    assert "does not cover the forecast" in err and "valid times" in err


def test_persistence_forecast_repeats_the_latest_state_and_summarise_gives_plain_lists():
    from diffkit_weather import evaluate as E
    from diffkit.errors import ShapeError
    from diffkit_weather.forecast import persistence

    h = torch.randn(3, 2, 4, 5, 6)                       # (N, history, C, lat, lon)
    p = persistence(h, 4)
    assert p.shape == (3, 1, 4, 4, 5, 6)
    for k in range(4):
        assert torch.equal(p[:, 0, k], h[:, -1])           # the latest input state, not the oldest
    with pytest.raises(ShapeError, match=r"expected \(N, history, C, lat, lon\)"):
        persistence(h[0], 2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        persistence(h, 0)
    import xarray as xr
    sc = xr.Dataset({m: (("channel", "lead_time"), np.array([[1.0, np.nan], [3.0, 4.0]]))
                     for m in ("rmse", "crps", "spread", "spread_skill_ratio")},
                    coords={"channel": ["a", "b"], "lead_hours": ("lead_time", [6.0, 12.0])})
    out = E.summarise(sc)
    assert out == {c: {"lead_hours": [6.0, 12.0], **{m: v for m in ("rmse", "crps", "spread", "spread_skill_ratio")}}
                   for c, v in (("a", [1.0, None]), ("b", [3.0, 4.0]))}
