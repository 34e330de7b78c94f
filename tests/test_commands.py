"""Plugin commands (the ``diffkit_commands`` hook) and the regression model type."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import diffkit as dk
from diffkit import registry
from diffkit.cli import main
from diffkit.denoiser import Cond, Regressor
from diffkit.losses import regression_loss


# -- commands ---------------------------------------------------------------------------------
def _register_hello(parser):
    """say hello (a test command)"""
    parser.add_argument("--who", default="world")
    parser.set_defaults(func=lambda args: print(f"hello {args.who}") or 0)


def _register_demo(parser):
    """a grouped test command"""
    parser.add_argument("--fail", action="store_true")

    def run(args):
        if args.fail:
            raise ValueError("demo failed on purpose; pass no --fail")
        print("demo ran")
        return 0
    parser.set_defaults(func=run)


def _register_train_clash(parser):
    """clashes with the built-in train command"""
    parser.set_defaults(func=lambda args: 0)


def _register_broken(parser):
    """raises while registering"""
    raise RuntimeError("cannot build my parser")


def _register_no_func(parser):
    """forgets set_defaults(func=...)"""
    parser.add_argument("--x")


class CommandPlugin:
    @dk.hookimpl
    def diffkit_commands(self):
        return {"hello": _register_hello, "data demo": _register_demo, "train": _register_train_clash,
                "broken": _register_broken, "nofunc": _register_no_func}


@pytest.fixture
def commands():
    registry.register_plugin(CommandPlugin(), "cmdplugin")
    yield
    registry.unregister_plugin("cmdplugin")


def test_plugin_command_runs_with_its_arguments(commands, capsys):
    assert main(["hello", "--who", "diffkit"]) == 0
    out = capsys.readouterr()
    assert "hello diffkit" in out.out


def test_grouped_plugin_command_and_one_line_error(commands, capsys):
    assert main(["data", "demo"]) == 0
    assert "demo ran" in capsys.readouterr().out
    assert main(["data", "demo", "--fail"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diffkit data demo: error: demo failed on purpose"), err
    assert main(["data"]) == 0  # the bare group prints its help, listing the commands
    assert "demo" in capsys.readouterr().out


def test_clashing_and_broken_commands_are_warnings_naming_the_plugin(commands, capsys):
    assert main(["hello"]) == 0
    err = capsys.readouterr().err
    warn = [l for l in err.splitlines() if l.startswith("warning:")]
    assert any("'cmdplugin'" in l and "'train'" in l and "clashes" in l for l in warn), err
    assert any("'cmdplugin'" in l and "'broken'" in l and "cannot build my parser" in l for l in warn), err
    assert any("'cmdplugin'" in l and "'nofunc'" in l and "set_defaults" in l for l in warn), err
    # the built-in train command is untouched
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "Train a diffusion model" in capsys.readouterr().out


def test_plugins_lists_commands(commands, capsys):
    assert main(["plugins", "--kind", "command"]) == 0
    out = capsys.readouterr().out
    rows = {l.split()[1] for l in out.splitlines()[1:] if l.split()}
    assert {"hello", "data", "rollout"} <= rows, out  # "data demo" / "data pde" start with "data"
    assert "say hello (a test command)" in out


def test_builtin_pde_commands_are_mounted(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "rollout" in out and "data" in out
    with pytest.raises(SystemExit):
        main(["data", "pde", "--help"])
    out = capsys.readouterr().out
    assert "ks" in out and "kolmogorov" in out and "--trajectories" in out


# -- the regression model type ---------------------------------------------------------------
class Recorder(nn.Module):
    """Returns ``w * x_in[:, C:]`` (the conditioning fields) and records its inputs."""

    def __init__(self, C: int):
        super().__init__()
        self.C = C
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, c_noise, scalars=None, labels=None):
        self.seen = (x.detach().clone(), c_noise.detach().clone(), scalars)
        return self.w * x[:, self.C:]


@pytest.mark.parametrize("spatial", [(), (5,), (4, 3), (2, 3, 2)])
def test_regressor_feeds_zeros_and_a_fixed_noise_level(spatial):
    names = ("a", "b", "c")[: len(spatial)]
    layout = dk.Layout(channels=("u",), spatial=names, shape=spatial, cond_channels=("u@t",))
    net = Recorder(1)
    model = Regressor(net, layout)
    f = torch.randn(6, 1, *spatial)
    out = model(Cond(fields=f))
    x_in, c, _ = net.seen
    assert torch.equal(x_in[:, :1], torch.zeros(6, 1, *spatial)) and torch.equal(x_in[:, 1:], f)
    assert torch.equal(c, torch.zeros(6))
    assert torch.allclose(out, 2 * f)
    # the loss is the per-sample weighted MSE
    x0 = torch.randn(6, 1, *spatial)
    w = torch.rand(1, *spatial) + 0.5
    got = regression_loss(model, x0, cond=Cond(fields=f), weight=w)
    want = ((w * (2 * f - x0) ** 2).flatten(1).sum(1) / w.expand_as(x0).flatten(1).sum(1))
    assert got.shape == (6,) and torch.allclose(got, want, rtol=1e-5)


def test_regressor_rejects_wrong_conditions():
    layout = dk.Layout(channels=("u",), spatial=("x",), shape=(8,), cond_channels=("u@t",))
    model = Regressor(Recorder(1), layout)
    with pytest.raises(dk.ShapeError, match="cond_channels|Cond.fields"):
        model(Cond(fields=torch.randn(2, 2, 8)))
    with pytest.raises(ValueError, match="needs conditions"):
        model(None)
    x0 = torch.randn(2, 1, 8)
    x0[0, 0, 3] = float("nan")
    with pytest.raises(dk.NonFiniteError):
        regression_loss(model, x0, cond=Cond(fields=torch.randn(2, 1, 8)))


def test_regression_objective_fits_least_squares():
    """The trainer with ``objective = "regression"`` minimises the MSE: on data y = 3 f the
    one-parameter Recorder converges to w = 3 (a diffusion model would not be fitted this way)."""
    from diffkit.train import Trainer
    from diffkit.config import config_from_dict
    from torch.utils.data import Dataset

    layout = dk.Layout(channels=("u",), spatial=("x",), shape=(8,), cond_channels=("u@t",))

    class Pairs(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.f = torch.randn(64, 1, 8, generator=g)

        def __len__(self):
            return 64

        def __getitem__(self, i):
            return {"x": 3 * self.f[i], "fields": self.f[i]}

    from diffkit.adapters import Adapter

    class PairAdapter(Adapter):
        name = "pairs"

        @property
        def layout(self):
            return layout

        def dataset(self, split):
            return Pairs()

    class Plug:
        @dk.hookimpl
        def diffkit_backbones(self):
            return {"recorder": lambda layout: Recorder(1)}

    registry.register_plugin(Plug(), "recorder-plugin")
    try:
        cfg = config_from_dict({"model": {"backbone": "recorder", "objective": "regression"},
                                "data": {"batch_size": 16},
                                "trainer": {"steps": 300, "lr": 0.05, "warmup": 0, "val_every": 0, "ckpt_every": 0,
                                            "ema_decay": 0.0, "grad_clip": "none"},
                                "run_dir": "unused"})
        tr = Trainer(cfg, adapter=PairAdapter(), progress=False)
        assert isinstance(tr.model, Regressor)
        batches = tr._batches()
        for _ in range(300):
            tr._train_step(batches)
        assert abs(float(tr.net.w.detach()) - 3.0) < 1e-3
    finally:
        registry.unregister_plugin("recorder-plugin")
