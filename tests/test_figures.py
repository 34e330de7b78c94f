"""Figures a new user reads without checking (issue 13, item 6 "Figures"): the PDE rollout figure
is labelled in the netCDF's own coordinates and names, and a class-conditional sample grid has one
full row per class by default.

The PDE figures are checked on the matplotlib objects (:func:`diffkit_pde.cli.rollout_figures`
returns them before ``diffkit rollout --plot`` writes them), not on pixels: axis labels, the
data limits of the image and the curves, the colour bar's label.  The rollout dataset is the one
``diffkit rollout`` writes (:func:`diffkit_pde.rollout_dataset`), built from a small file whose x
coordinate runs over 0..1 (not the grid index) and whose time starts far from 0 (so absolute time
and lead time differ), with a made-up prediction: what is drawn does not depend on a model.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

try:
    import diffkit_pde as P
except ImportError:  # editable install made before the plugin existed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    import diffkit_pde as P

from diffkit_pde import plots
from diffkit_pde.adapter import TrajectoryAdapter
from diffkit_pde.cli import plot_rollout, rollout_figures

from _tiny_unet import TINY_UNET_TOML

NX, T, T_START, DT = 24, 14, 100.0, 0.25


def _file(path: Path, two_d: bool = False) -> Path:
    rng = np.random.default_rng(0)
    x = np.arange(NX) / NX                                   # positions over L: 0 .. 1
    time = T_START + DT * np.arange(T)
    if two_d:
        u = rng.normal(size=(3, T, NX, 8))
        ds = xr.Dataset({"omega": (("trajectory", "time", "x", "y"), u, {"units": "1"})},
                        coords={"x": ("x", x, {"long_name": "position divided by the domain length L", "units": "1"}),
                                "y": ("y", np.arange(8) / 8), "time": ("time", time, {"units": "1"})})
    else:
        u = np.sin(2 * np.pi * x)[None, None] + 0.1 * rng.normal(size=(3, T, NX))
        ds = xr.Dataset({"u": (("trajectory", "time", "x"), u, {"units": "1"})},
                        coords={"x": ("x", x, {"long_name": "position divided by the domain length L", "units": "1"}),
                                "time": ("time", time, {"units": "1"})})
    ds.to_netcdf(path)
    return path


def _rollout(tmp_path, two_d=False, members=3, steps=6, start=2):
    f = _file(tmp_path / "traj.nc", two_d)
    layout = TrajectoryAdapter(path=str(f), history=1, val_fraction=0.34).layout
    ic = P.initial_condition(f, layout, index=0, start=start)
    g = torch.Generator().manual_seed(0)
    pred = ic.truth[:steps][None] + 0.1 * torch.randn((members, steps, *ic.truth.shape[1:]), generator=g)
    return P.rollout_dataset(pred, layout, ic), layout, ic


def _main_axes(fig):
    """The axes holding a QuadMesh/image (the panels), in order."""
    return [ax for ax in fig.axes if (ax.collections or ax.images) and getattr(ax, "_colorbar", None) is None]


def _colourbar_labels(fig) -> list[str]:
    """Labels of the figure's colour bars (an axes a colour bar was drawn into has ``_colorbar``)."""
    return [ax.get_ylabel() for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]


def test_rollout_png_x_axis_in_physical_units(tmp_path):
    ds, layout, _ = _rollout(tmp_path)
    (png, fig), _ = rollout_figures(ds, layout, tmp_path / "rollout.png")
    assert png == tmp_path / "rollout.png"
    x = ds["x"].values
    assert x.max() < 1 < NX - 1                                       # coordinate and index differ
    half = (x[1] - x[0]) / 2
    panels = _main_axes(fig)
    assert len(panels) == 1 + 3 + 3                                    # truth, 2 members + mean, 3 errors
    for ax in panels:
        # the cells are centred on the netCDF's x values: limits x[0] - dx/2 .. x[-1] + dx/2, not -0.5 .. NX - 0.5
        np.testing.assert_allclose(ax.get_xlim(), (x[0] - half, x[-1] + half), rtol=1e-12)
        long_name = ds["x"].attrs.get("long_name")
        name = f"x: {long_name}" if long_name not in (None, "", "x") else "x"
        assert ax.get_xlabel() == plots.axis_label(name, ds["x"].attrs["units"])
    assert panels[0].get_xlabel().startswith("x") and "(nondimensional)" in panels[0].get_xlabel()
    # the coordinate's name, long_name and units, whatever they are, reach the label
    ds2 = ds.assign_coords(x=("x", x * 64.0, {"units": "m", "long_name": "position"}))
    (_, fig2), _ = rollout_figures(ds2, layout, tmp_path / "r2.png")
    ax = _main_axes(fig2)[0]
    assert ax.get_xlabel() == "x: position [m]" and ax.get_xlim()[1] == pytest.approx(64 * (x[-1] + half))
    # and the plot function alone labels an index axis as such
    fig3 = plots.space_time_figure(np.zeros((4, 5)), {"a": np.ones((4, 5))})
    assert _main_axes(fig3)[0].get_xlabel() == "grid index"


def test_rollout_png_time_axis_label_matches_correlation_plot(tmp_path):
    ds, layout, ic = _rollout(tmp_path, steps=6, start=2)
    (_, st), (cp, corr) = rollout_figures(ds, layout, tmp_path / "rollout.png")
    assert cp == tmp_path / "rollout-correlation.png"
    t = ds["time"].values
    assert t[0] > T_START                                             # absolute times are far from the lead times
    lead = DT * np.arange(1, len(t) + 1)
    np.testing.assert_allclose(t - ic.t0, lead)
    st_ax = _main_axes(st)[0]
    corr_ax = corr.axes[0]
    # the same quantity under the same label in both figures: the lead time since the initial condition
    assert st_ax.get_ylabel() == corr_ax.get_xlabel() == "lead time (nondimensional)"
    np.testing.assert_allclose(st_ax.get_ylim(), (lead[0] - DT / 2, lead[-1] + DT / 2), rtol=1e-12)
    curves = [ln for ln in corr_ax.get_lines() if ln.get_linestyle() == "-"]
    assert len(curves) == 2                                           # members' mean, ensemble mean
    for ln in curves:
        np.testing.assert_allclose(ln.get_xdata(), lead)
    assert f"{ic.t0:.4g}" in st._suptitle.get_text()                 # where lead time 0 is
    # the plot functions alone: the default is lead time, an absolute t0 says "time"
    assert _main_axes(plots.space_time_figure(np.zeros((3, 4)), {}))[0].get_ylabel() == "lead time"
    assert _main_axes(plots.space_time_figure(np.zeros((3, 4)), {}, t0=5.0))[0].get_ylabel() == "time"
    assert plots.correlation_figure({"a": np.ones(3)}).axes[0].get_xlabel() == "lead time"


def test_rollout_png_colourbar_names_variable(tmp_path):
    ds, layout, _ = _rollout(tmp_path)
    (_, fig), _ = rollout_figures(ds, layout, tmp_path / "rollout.png")
    field = plots.axis_label("u", ds["u"].attrs["units"])
    assert _colourbar_labels(fig) == [field, f"error in {field}"]
    assert "field" not in " ".join(_colourbar_labels(fig))
    ds2 = ds.copy()
    ds2["u"].attrs["units"] = "m s-1"
    (_, fig2), _ = rollout_figures(ds2, layout, tmp_path / "r2.png")
    assert _colourbar_labels(fig2) == ["u [m s-1]", "error in u [m s-1]"]
    # 2-D fields: snapshots, the colour bar names the first state variable too
    (tmp_path / "2d").mkdir()
    ds3, layout3, _ = _rollout(tmp_path / "2d", two_d=True)
    (_, snap), _ = rollout_figures(ds3, layout3, tmp_path / "snap.png")
    assert _colourbar_labels(snap) == [plots.axis_label("omega", ds3["omega"].attrs["units"])]
    # and the written files are PNGs
    written = plot_rollout(ds, layout, tmp_path / "out.png")
    assert [p.name for p in written] == ["out.png", "out-correlation.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


# ============================================================================= images: the sample grid
IMAGES_CONFIG = """
run_dir = "{run}"
[data]
adapter = "images"
options = {{ source = "digits", max_images = 200 }}
batch_size = 16
""" + TINY_UNET_TOML + """
[trainer]
steps = 2
warmup = 1
log_every = 1
val_every = 0
ckpt_every = 0
snapshot_every = 2
[sample]
nfe = 2
"""


def _rows(z) -> list[list[int]]:
    """The grid's rows, as the labels of the samples in each (from make_grid's cell positions)."""
    from diffkit_images import make_grid

    _, pos, _ = make_grid(z["pixels"], z["labels"])
    tops = sorted({p[1] for p in pos})
    return [[int(z["labels"][i]) for i in range(len(pos)) if pos[i][1] == t] for t in tops]


def test_sample_grid_default_n_gives_full_rows_per_class(tmp_path, capsys):
    from PIL import Image

    from diffkit.cli import main
    from diffkit.model import class_balanced_count
    from diffkit_images import make_grid
    from diffkit.config import SampleConfig

    default_n = SampleConfig().n
    assert default_n % 10 != 0                       # the default alone would give uneven rows for 10 digits
    cfg = tmp_path / "digits.toml"
    cfg.write_text(IMAGES_CONFIG.format(run=(tmp_path / "run").as_posix()))
    assert main(["train", str(cfg), "--no-progress", "--device", "cpu"]) == 0
    want = -(-default_n // 10) * 10                  # 16 -> 20: two per class
    assert class_balanced_count(default_n, 10) == want and class_balanced_count(default_n, 0) == default_n
    # the training snapshot: sample.n rounded up too
    snap = np.load(tmp_path / "run" / "snapshots" / "step-000000002.npz", allow_pickle=False)
    assert sorted(snap["labels"].tolist()) == sorted(list(range(10)) * (want // 10))
    assert _rows(snap) == [[k] * (want // 10) for k in range(10)]
    capsys.readouterr()
    # `diffkit sample` with the default n: every class a full row of the same length
    assert main(["sample", str(tmp_path / "run"), "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {want} samples" in out and f"({want // 10} per class)" in out
    assert f"sample.n = {default_n} rounded up" in out
    z = np.load(tmp_path / "s.npz", allow_pickle=False)
    assert np.bincount(z["labels"], minlength=10).tolist() == [want // 10] * 10
    rows = _rows(z)
    assert rows == [[k] * (want // 10) for k in range(10)]
    img, _, _ = make_grid(z["pixels"], z["labels"])
    assert Image.open(tmp_path / "s.png").size == img.size
    # an explicit --n is drawn as given (and the output says the classes are uneven)
    assert main(["sample", str(tmp_path / "run"), "--n", str(default_n), "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "e.png")]) == 0
    assert "not the same number per class" in capsys.readouterr().out
    assert len(np.load(tmp_path / "e.npz", allow_pickle=False)["labels"]) == default_n
    # one class: as many as asked
    assert main(["sample", str(tmp_path / "run"), "--label", "3", "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "three.png")]) == 0
    assert np.load(tmp_path / "three.npz", allow_pickle=False)["labels"].tolist() == [3] * default_n
