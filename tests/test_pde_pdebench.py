"""PDEBench HDF5 reading (``diffkit_pde.pdebench``): the three layouts written by
``write_pdebench`` (and by hand with h5py) read back exactly into the plugin's netCDF
convention, axis roles from coordinate lengths, lazy reading, fallbacks and every error path.
PDEBench's own files are downloads, so all files here are small ones written in ``tmp_path``.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import h5py  # a dependency of diffkit: missing it is a failure, not a skip
import xarray as xr

try:
    import diffkit_pde as P
except ImportError:  # editable install made before the plugin existed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    import diffkit_pde as P

from diffkit.errors import DiffkitError
from diffkit_pde.pdebench import (MissingCoordinateWarning, PDEBenchError, PDEBenchFileNotFoundError,
                                  is_hdf5, is_pdebench, read_pdebench, write_pdebench)

RNG = np.random.default_rng(0)
NS, NT, NX, NY = 3, 5, 8, 6
X = (np.arange(NX) + 0.5) / NX                 # cell centres, as PDEBench
Y = np.linspace(-1.0, 1.0, NY)
T = np.linspace(0.0, 2.0, NT)


def _check_coords(ds, t=T, x=X, y=None):
    assert ds.sizes["trajectory"] == ds["dt"].size
    np.testing.assert_array_equal(ds["trajectory"].values, np.arange(ds.sizes["trajectory"]))
    np.testing.assert_array_equal(ds["time"].values, t)
    np.testing.assert_array_equal(ds["x"].values, x)
    assert ds["time"].attrs["axis"] == "T" and ds["x"].attrs["axis"] == "X"
    np.testing.assert_allclose(ds["dt"].values, t[1] - t[0], rtol=1e-12)
    np.testing.assert_allclose(ds["dx"].values, x[1] - x[0], rtol=1e-12)
    assert ds["dt"].dims == ("trajectory",) and ds["dx"].dims == ("trajectory",)
    if y is not None:
        np.testing.assert_array_equal(ds["y"].values, y)
        assert ds["y"].attrs["axis"] == "Y"
        np.testing.assert_allclose(ds["dy"].values, y[1] - y[0], rtol=1e-12)
    assert ds.attrs["Conventions"] == "CF-1.8"
    for v in ds.data_vars.values():
        assert "long_name" in v.attrs and "units" in v.attrs


# ----------------------------------------------------------------------------- layout 1: tensor
def test_tensor_1d_one_channel_matches_simulator_convention(tmp_path):
    r = P.simulate_burgers(2, 3, nx=32)
    sim = P.to_dataset(r)
    f = write_pdebench(tmp_path / "1D_Burgers_Sols_Nu0.01.hdf5", sim["u"].values,
                       x=sim["x"].values, t=sim["time"].values, attrs={"equation": "burgers", "version": 2})
    ds = read_pdebench(f, params={"nu": 0.01})
    assert ds["u"].dims == sim["u"].dims == ("trajectory", "time", "x")
    assert set(ds.dims) == set(sim.dims) and set(ds.coords) == set(sim.coords)
    assert {"u", "dx", "dt"} <= set(ds.data_vars) & set(sim.data_vars)
    for k in ("u", "dx", "dt"):
        assert ds[k].dims == sim[k].dims
        np.testing.assert_allclose(ds[k].values, sim[k].values, rtol=1e-12)
    for c in ("time", "x"):
        assert ds[c].attrs["axis"] == sim[c].attrs["axis"]
        np.testing.assert_array_equal(ds[c].values, sim[c].values)
    assert ds.attrs["source"] == "PDEBench HDF5 file 1D_Burgers_Sols_Nu0.01.hdf5"
    assert ds.attrs["equation"] == "burgers" and ds.attrs["version"] == 2
    assert ds.attrs["nu"] == 0.01 and ds["nu"].dims == ("trajectory",)
    np.testing.assert_array_equal(ds["nu"].values, [0.01, 0.01])
    assert ds.attrs["pdebench_layout"] == "tensor"
    ds.to_netcdf(tmp_path / "roundtrip.nc")                 # the convention survives netCDF


def test_tensor_1d_two_channels_and_names(tmp_path):
    u = RNG.normal(size=(NS, NT, NX, 2)).astype(np.float32)
    f = write_pdebench(tmp_path / "a.h5", u, x=X, t=T)
    ds = read_pdebench(f)
    assert list(ds.data_vars) == ["u0", "u1", "dx", "dt"]
    for i in range(2):
        assert ds[f"u{i}"].dtype == np.float32
        np.testing.assert_array_equal(ds[f"u{i}"].values, u[..., i])
    _check_coords(ds)
    named = read_pdebench(f, channel_names=["rho", "m"], variables="m")
    assert list(named.data_vars) == ["m", "dx", "dt"]
    np.testing.assert_array_equal(named["m"].values, u[..., 1])


def test_data_name_int_dtype_and_axes_from_coordinate_lengths(tmp_path):
    # stored as (sample, x, time): roles come from the coordinate lengths, not positions
    u = RNG.integers(0, 100, size=(2, NX, NT))
    f = tmp_path / "t.h5"
    with h5py.File(f, "w") as h:
        h["data"] = u
        h["x-coordinate"] = X
        h["t-coordinate"] = T
    ds = read_pdebench(f)
    assert ds["u"].dims == ("trajectory", "time", "x") and ds["u"].dtype == np.float64
    np.testing.assert_array_equal(ds["u"].values, u.transpose(0, 2, 1))
    lazy = read_pdebench(f, lazy=True)
    np.testing.assert_array_equal(lazy["u"].isel(time=slice(1, 4), x=[0, 5]).values, u.transpose(0, 2, 1)[:, 1:4][:, :, [0, 5]])
    lazy.close()


def test_t_coordinate_with_one_extra_entry(tmp_path):
    u = RNG.normal(size=(2, NT, NX))
    te = np.linspace(0.0, 2.0, NT + 1).astype(np.float32)    # PDEBench 1-D files: cell edges, float32
    f = write_pdebench(tmp_path / "edges.h5", u, x=X, t=te)
    ds = read_pdebench(f)
    np.testing.assert_array_equal(ds["time"].values, te[:NT].astype(np.float64))
    np.testing.assert_allclose(ds["dt"].values, 0.4, rtol=1e-6)
    np.testing.assert_array_equal(ds["u"].values, u)


def test_tensor_2d_with_channel(tmp_path):
    u = RNG.normal(size=(2, NT, NX, NY, 3))
    f = write_pdebench(tmp_path / "2d.h5", u, x=X, y=Y, t=T)
    ds = read_pdebench(f)
    assert ds["u2"].dims == ("trajectory", "time", "x", "y")
    np.testing.assert_array_equal(ds["u2"].values, u[..., 2])
    _check_coords(ds, y=Y)


# ----------------------------------------------------------------------------- layout 2: fields
def test_fields_2d(tmp_path):
    flds = {k: RNG.normal(size=(NS, NT, NX, NY)) for k in ("density", "Vx", "Vy")}
    flds["pressure"] = RNG.normal(size=(NS, NT, NX, NY)).astype(np.float32)
    f = write_pdebench(tmp_path / "2D_CFD.hdf5", flds, x=X, y=Y, t=T, layout="fields")
    ds = read_pdebench(f)
    assert ds.attrs["pdebench_layout"] == "fields"
    for k, v in flds.items():
        assert ds[k].dims == ("trajectory", "time", "x", "y") and ds[k].dtype == v.dtype
        np.testing.assert_array_equal(ds[k].values, v)
    assert ds["Vx"].attrs["long_name"] == "x component of velocity"
    _check_coords(ds, y=Y)
    sub = read_pdebench(f, variables=["Vy", "density"])
    assert [k for k in sub.data_vars if k in flds] == ["Vy", "density"]


# ----------------------------------------------------------------------------- layout 3: groups
def test_groups_2d_channel_last(tmp_path):
    u = RNG.normal(size=(NS, NT, NX, NY, 2)).astype(np.float32)
    f = write_pdebench(tmp_path / "2D_diff-react.h5", u, x=X, y=Y, t=T, layout="groups")
    with h5py.File(f) as h:
        assert sorted(h) == ["0000", "0001", "0002"] and h["0001/data"].shape == (NT, NX, NY, 2)
        assert set(h["0000/grid"]) == {"x", "y", "t"}
    ds = read_pdebench(f, channel_names=["u", "v"])
    assert ds.attrs["pdebench_layout"] == "groups"
    np.testing.assert_array_equal(ds["u"].values, u[..., 0])
    np.testing.assert_array_equal(ds["v"].values, u[..., 1])
    _check_coords(ds, y=Y)


def test_groups_with_per_sample_times(tmp_path):
    u = RNG.normal(size=(2, NT, NX, 1))
    f = write_pdebench(tmp_path / "g.h5", u, x=X, t=T, layout="groups")
    with h5py.File(f, "a") as h:
        del h["0001/grid/t"]
        h["0001/grid/t"] = 3 * T
    ds = read_pdebench(f)
    np.testing.assert_array_equal(ds["time"].values, np.arange(NT))         # step index, as to_dataset
    np.testing.assert_array_equal(ds["t"].values, np.stack([T, 3 * T]))
    np.testing.assert_allclose(ds["dt"].values, [0.5, 1.5])


# ----------------------------------------------------------------------------- lazy
@pytest.mark.parametrize("layout", ["tensor", "fields", "groups"])
def test_lazy_equals_eager(tmp_path, layout):
    flds = {"a": RNG.normal(size=(NS, NT, NX, NY)), "b": RNG.normal(size=(NS, NT, NX, NY))}
    f = write_pdebench(tmp_path / f"{layout}.h5", flds, x=X, y=Y, t=T, layout=layout)
    eager = read_pdebench(f)
    lazy = read_pdebench(f, lazy=True)
    name = list(eager.data_vars)[1]
    var = lazy[name].variable
    assert not isinstance(var._data, np.ndarray)                            # not read yet
    sel = dict(trajectory=slice(None, None, -2), time=1, x=slice(1, 7, 2), y=[0, 4])
    np.testing.assert_array_equal(lazy[name].isel(sel).values, eager[name].isel(sel).values)
    np.testing.assert_array_equal(lazy[name].isel(trajectory=2).values, eager[name].isel(trajectory=2).values)
    assert lazy.load().identical(eager)
    with pytest.raises(OSError):             # the lazy dataset holds the file open ...
        h5py.File(f, "a")
    lazy.close()
    h5py.File(f, "a").close()                # ... until ds.close()


# ----------------------------------------------------------------------------- fallbacks
def test_missing_coordinates_warn_and_fall_back(tmp_path):
    u = RNG.normal(size=(2, NT, NX))
    f = write_pdebench(tmp_path / "nocoords.h5", u, x=None, t=None)
    with pytest.warns(MissingCoordinateWarning, match="no t-coordinate, x-coordinate.*arange"):
        ds = read_pdebench(f)
    np.testing.assert_array_equal(ds["time"].values, np.arange(NT))
    np.testing.assert_array_equal(ds["x"].values, np.arange(NX) / NX)
    np.testing.assert_array_equal(ds["dx"].values, [1 / NX] * 2)
    np.testing.assert_array_equal(ds["dt"].values, [1.0, 1.0])
    np.testing.assert_array_equal(ds["u"].values, u)
    f2 = write_pdebench(tmp_path / "not.h5", u, x=X, t=None)
    with pytest.warns(MissingCoordinateWarning, match="t-coordinate"):
        read_pdebench(f2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_pdebench(write_pdebench(tmp_path / "ok.h5", u, x=X, t=T))   # no warning with coordinates


# ----------------------------------------------------------------------------- file detection
def test_is_hdf5_and_is_pdebench(tmp_path):
    f = write_pdebench(tmp_path / "p.h5", RNG.normal(size=(1, 2, 4)), x=np.arange(4.), t=np.arange(2.))
    nc4 = tmp_path / "sim.nc"
    xr.Dataset({"u": (("a",), np.arange(3.0))}).to_netcdf(nc4, engine="netcdf4", format="NETCDF4")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello\n")
    assert is_hdf5(f) and is_pdebench(f)
    assert is_hdf5(nc4) and not is_pdebench(nc4)
    assert not is_hdf5(txt) and not is_pdebench(txt)
    assert not is_hdf5(tmp_path / "missing.h5") and not is_hdf5(tmp_path)


# ----------------------------------------------------------------------------- errors
def test_error_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        read_pdebench(tmp_path / "nope.h5")
    assert isinstance(e.value, (DiffkitError, PDEBenchFileNotFoundError)) and "nope.h5" in str(e.value)


def test_error_not_hdf5(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("not data\n")
    with pytest.raises(PDEBenchError, match="notes.txt.*not an HDF5 file"):
        read_pdebench(txt)
    nc3 = tmp_path / "old.nc"
    xr.Dataset({"u": (("a",), np.arange(3.0))}).to_netcdf(nc3, format="NETCDF3_64BIT")
    with pytest.raises(ValueError, match="old.nc.*netCDF-3.*xarray.open_dataset"):
        read_pdebench(nc3)
    nc4 = tmp_path / "new.nc"
    xr.Dataset({"u": (("a", "b", "c"), np.zeros((2, 3, 4)))}).to_netcdf(nc4, engine="netcdf4")
    with pytest.raises(PDEBenchError, match="new.nc.*netCDF-4.*xarray.open_dataset"):
        read_pdebench(nc4)
    with pytest.raises(PDEBenchError, match="not a file"):
        read_pdebench(tmp_path)


def test_error_no_layout_lists_datasets(tmp_path):
    f = tmp_path / "odd.h5"
    with h5py.File(f, "w") as h:
        h["weights"] = np.zeros((4, 4))
        h.create_group("meta")["labels"] = np.arange(3)
    with pytest.raises(PDEBenchError, match=r"no recognisable PDEBench layout in 'odd.h5'.*meta/labels \(3,\), weights \(4, 4\).*'tensor'.*'fields'.*'groups'"):
        read_pdebench(f)


def test_error_unknown_variables_lists_available(tmp_path):
    flds = {k: np.zeros((1, 2, 4)) for k in ("density", "Vx")}
    f = write_pdebench(tmp_path / "cfd.h5", flds, x=np.arange(4.), t=np.arange(2.), layout="fields")
    with pytest.raises(PDEBenchError, match=r"\['Vz'\] not in .*available: \['Vx', 'density'\]"):
        read_pdebench(f, variables=["Vx", "Vz"])
    g = write_pdebench(tmp_path / "t.h5", np.zeros((1, 2, 4, 2)), x=np.arange(4.), t=np.arange(2.))
    with pytest.raises(PDEBenchError, match=r"\['u'\] not in .*available: \['u0', 'u1'\]"):
        read_pdebench(g, variables="u")
    with pytest.raises(PDEBenchError, match="channel_names has 3 name"):
        read_pdebench(g, channel_names=["a", "b", "c"])


def test_error_inconsistent_or_ambiguous_axes_and_grids(tmp_path):
    f = write_pdebench(tmp_path / "bad.h5", np.zeros((2, NT, NX)), x=X, t=T)
    with h5py.File(f, "a") as h:
        del h["x-coordinate"]
        h["x-coordinate"] = np.arange(NX + 3.0)
    with pytest.raises(PDEBenchError, match="does not fit the coordinate lengths"):
        read_pdebench(f)
    # t fits only the last axis; x and y (both 4) fit any two of the three axes of length 4
    amb = tmp_path / "amb.h5"
    with h5py.File(amb, "w") as h:
        h["tensor"] = np.zeros((1, 4, 4, 4, 3))
        h["x-coordinate"] = np.arange(4.0)
        h["y-coordinate"] = np.arange(4.0)
        h["t-coordinate"] = np.arange(4.0) * 0.1      # length 4 = 3 + 1 (edges) or 4: fits any axis
    assert read_pdebench(amb).sizes == {"trajectory": 1, "time": 4, "x": 4, "y": 4}   # PDEBench order
    with h5py.File(amb, "a") as h:
        del h["t-coordinate"]
        h["t-coordinate"] = np.arange(3.0)
    with pytest.raises(PDEBenchError, match="cannot tell the axes"):
        read_pdebench(amb)
    nu = write_pdebench(tmp_path / "nu.h5", np.zeros((1, 4, 4)), x=np.array([0, 1, 2, 4.0]), t=np.arange(4.))
    with pytest.raises(PDEBenchError, match="x-coordinate.*not uniformly spaced"):
        read_pdebench(nu)
    nt = write_pdebench(tmp_path / "nt.h5", np.zeros((1, 4, 4)), x=np.arange(4.), t=np.array([0, 1, 2, 3.001]))
    with pytest.raises(PDEBenchError, match="t-coordinate.*not uniformly spaced"):
        read_pdebench(nt)
    g = write_pdebench(tmp_path / "g.h5", np.zeros((2, 3, 4, 1)), x=np.arange(4.), t=np.arange(3.), layout="groups")
    with h5py.File(g, "a") as h:
        del h["0001/grid/x"]
        h["0001/grid/x"] = np.arange(4.0) * 2
    with pytest.raises(PDEBenchError, match="'0001'.*different grid/x"):
        read_pdebench(g)
    with pytest.raises(PDEBenchError, match="not a number"):
        read_pdebench(nt, params={"nu": "0.01"})
