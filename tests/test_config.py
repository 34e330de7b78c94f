"""diffkit.config: files onto frozen dataclasses, validation, --set overrides, round trips."""
from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import pytest

from diffkit import losses, param, samplers
from diffkit.config import (Config, DataConfig, FieldDoc, LossConfig, ModelConfig, SampleConfig,
                            TrainerConfig, apply_overrides, config_from_dict, config_to_dict, describe,
                            dump_config, format_config_help, format_config_markdown, load_config)
from diffkit.errors import ConfigError

SECTIONS = [DataConfig, ModelConfig, LossConfig, TrainerConfig, SampleConfig, Config]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def custom() -> Config:
    """A config with every kind of value away from its default."""
    return config_from_dict({
        "data": {"adapter": "netcdf", "options": {"path": "era5.nc", "vars": ["t2m", "u10"], "nested": {"a": 1.5}},
                 "val_fraction": 0.1, "workers": 2, "batch_size": 32},
        "model": {"backbone": "unet", "options": {"channels": 32, "mults": [1, 2, 4]}, "parameterization": "eps",
                  "schedule": {"name": "linear", "T": 1000}},
        "loss": {"weighting": "vdm", "gamma": 3.0, "p_uncond": 0.0},
        "trainer": {"steps": 5000, "time_budget": 3600.0, "lr": 1e-4, "betas": [0.9, 0.95], "grad_clip": None,
                    "grad_accum": 2, "ema_warmup": False, "precision": "bf16", "compile": True, "seed": 7,
                    "snapshot_every": 100, "deterministic": True},
        "sample": {"sampler": "heun", "nfe": 35, "spacing": "karras", "n": 4, "guidance": 2.5},
        "run_dir": "runs/era5",
    })


# -- defaults, structure, documentation --------------------------------------------------------
def test_defaults():
    cfg = Config()
    assert cfg.data.adapter == "mixture" and cfg.data.batch_size == 64 and cfg.data.options == {}
    assert cfg.model.parameterization == "v" and cfg.model.schedule == "cosine"
    assert cfg.loss.weighting is None and cfg.loss.noise is None and cfg.loss.gamma == 5.0  # resolved by the trainer
    assert cfg.trainer.betas == (0.9, 0.999) and cfg.trainer.time_budget is None and cfg.trainer.grad_clip == 1.0
    assert cfg.trainer.precision == "auto" and cfg.trainer.snapshot_every == 0
    assert cfg.sample.sampler == "dpmpp_2m" and cfg.sample.spacing is None
    assert cfg.run_dir == "runs/default"
    assert config_from_dict({}) == cfg


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_frozen(cls):
    obj = cls()
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, name, getattr(obj, name))


def test_every_field_documented():
    docs = describe(Config)
    n_fields = sum(len(dataclasses.fields(c)) for c in SECTIONS[:-1]) + 1  # + run_dir
    assert len(docs) == n_fields
    for key, d in docs.items():
        assert isinstance(d, FieldDoc)
        assert d.help.strip(), f"config key {key} has no docstring"
    for cls in SECTIONS[:-1]:
        assert (cls.__doc__ or "").strip(), f"{cls.__name__} has no docstring"
        assert set(describe(cls)) == {f.name for f in dataclasses.fields(cls)}


def test_describe_contents():
    docs = describe()
    t, default, help_ = docs["trainer.lr"]
    assert t is float and default == 2e-4 and "learning rate" in help_
    assert docs["trainer.betas"].default == (0.9, 0.999) and docs["trainer.betas"].type_name == "tuple[float, float]"
    assert docs["trainer.grad_clip"].type_name == "float | None"
    assert docs["model.parameterization"].type_name == "'eps' | 'x0' | 'v'"
    assert docs["data.options"].default == {}
    assert list(describe(TrainerConfig))[0] == "steps"


def test_help_lists_every_key():
    text = format_config_help()
    for key, d in describe().items():
        assert key in text and d.help.split()[0] in text
    assert "[trainer]" in text and "trainer.lr = 0.0002  (float)" in text


def test_choices_match_the_engine():
    assert get_args(describe()["loss.weighting"].type)[0] == Literal[losses.WEIGHTINGS]  # (| None: resolved later)
    assert get_args(describe()["model.parameterization"].type) == param.PARAMETERIZATIONS
    for spacing in samplers.SPACINGS:
        assert SampleConfig(spacing=spacing).spacing == spacing


# -- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["config.toml", "config.yaml", "c.yml"])
def test_round_trip(tmp_path, name):
    cfg = custom()
    path = dump_config(cfg, tmp_path / "run" / name)  # creates the run directory
    assert path.exists() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    back = load_config(path)
    assert back == cfg
    assert back.trainer.grad_clip is None and back.trainer.betas == (0.9, 0.95)
    assert isinstance(back.trainer.betas, tuple)
    assert load_config(dump_config(Config(), tmp_path / name)) == Config()


def test_toml_dump_omits_unset_values(tmp_path):
    cfg = apply_overrides(Config(), ["trainer.grad_clip=null"])
    text = dump_config(cfg, tmp_path / "c.toml").read_text()
    assert "time_budget" not in text and "spacing" not in text and "guidance" not in text
    assert 'grad_clip = "none"' in text  # its default is set, so None needs a marker
    assert load_config(tmp_path / "c.toml") == cfg
    dump_config(Config(), tmp_path / "c.toml")  # overwriting works
    assert load_config(tmp_path / "c.toml") == Config()


def test_none_inside_options_is_not_toml(tmp_path):
    cfg = apply_overrides(Config(), ["model.options.dropout=null"])
    assert cfg.model.options == {"dropout": None}
    with pytest.raises(ConfigError, match=r"model\.options\.dropout.*TOML has no null"):
        dump_config(cfg, tmp_path / "c.toml")
    assert not list(tmp_path.iterdir())  # nothing half-written
    assert load_config(dump_config(cfg, tmp_path / "c.yaml")) == cfg


def test_config_to_dict():
    d = config_to_dict(custom())
    assert d["trainer"]["betas"] == [0.9, 0.95] and d["trainer"]["grad_clip"] is None
    assert d["model"]["schedule"] == {"name": "linear", "T": 1000}
    assert config_from_dict(d) == custom()
    d["model"]["options"]["channels"] = 1  # a copy
    assert custom().model.options["channels"] == 32


def test_loading_fills_defaults_and_converts(tmp_path):
    p = write(tmp_path, "c.toml", '[trainer]\nlr = 1\nbetas = [0.5, 0.9]\n\n[model.options]\nchannels = 8\n')
    cfg = load_config(p)
    assert cfg.trainer.lr == 1.0 and isinstance(cfg.trainer.lr, float)  # int accepted for float
    assert cfg.trainer.betas == (0.5, 0.9) and cfg.model.options == {"channels": 8}
    assert cfg.data == DataConfig() and cfg.trainer.steps == 1000


def test_yaml_reads_exponents_as_floats(tmp_path):
    p = write(tmp_path, "c.yaml", "trainer:\n  lr: 1e-4\n  grad_clip: null\nsample:\n  guidance: 2\n")
    cfg = load_config(p)
    assert cfg.trainer.lr == 1e-4 and cfg.trainer.grad_clip is None and cfg.sample.guidance == 2.0
    assert load_config(write(tmp_path, "e.yaml", "")) == Config()


def test_none_string_in_toml(tmp_path):
    cfg = load_config(write(tmp_path, "c.toml", '[trainer]\ngrad_clip = "none"\n'))
    assert cfg.trainer.grad_clip is None


# -- errors ------------------------------------------------------------------------------------
def test_unknown_nested_key_names_file_and_suggests(tmp_path):
    p = write(tmp_path, "c.toml", "[trainer]\nlrr = 1e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "'trainer.lrr'" in msg and str(p) in msg and "did you mean 'trainer.lr'" in msg
    assert "Valid keys in [trainer]" in msg and "grad_clip" in msg
    assert e.value.key == "trainer.lrr" and e.value.source == str(p)


def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, "c.yaml", "trainr:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trainr' in .*c\.yaml; did you mean 'trainer'\?"
                                          r" Valid keys at the top level: data, model, loss, trainer, sample, run_dir"):
        load_config(p)


def test_key_in_the_wrong_section():
    with pytest.raises(ConfigError, match=r"'trainer\.batch_size'.*did you mean 'data\.batch_size'"):
        config_from_dict({"trainer": {"batch_size": 8}})
    with pytest.raises(ConfigError, match=r"unknown key 'lr' in <dict>; did you mean 'trainer\.lr'"):
        config_from_dict({"lr": 1e-3})


@pytest.mark.parametrize("section, key, value, pattern", [
    ("trainer", "steps", 1.5, r"'trainer\.steps' in f\.toml must be int, got 1\.5 \(float\)"),
    ("trainer", "steps", 1e4, r"write 10000"),
    ("trainer", "steps", True, r"must be int, got True \(bool\); a bool is not a number"),
    ("trainer", "lr", False, r"'trainer\.lr' .* must be float, got False \(bool\)"),
    ("trainer", "lr", "1e-4", r"must be float, got '1e-4' \(str\); remove the quotes"),
    ("trainer", "compile", 1, r"'trainer\.compile' .* must be bool, got 1 \(int\); write true or false"),
    ("trainer", "deterministic", "yes", r"must be bool"),
    ("data", "adapter", 3, r"'data\.adapter' .* must be str, got 3"),
    ("data", "options", [1, 2], r"'data\.options' .* must be a table \(dict\[str, Any\]\)"),
    ("model", "schedule", 3, r"'model\.schedule' .* must be str \| dict\[str, Any\], got 3"),
    ("trainer", "time_budget", "soon", r"'trainer\.time_budget' .* must be float \| None, got 'soon'"),
    ("trainer", "betas", 0.9, r"'trainer\.betas' .* must be a list \(tuple\[float, float\]\)"),
    ("trainer", "betas", [0.9], r"must be a list of 2 values \(tuple\[float, float\]\), got 1: \[0\.9\]"),
    ("trainer", "betas", [0.9, 0.99, 0.999], r"must be a list of 2 values .* got 3"),
    ("trainer", "betas", [0.9, "x"], r"'trainer\.betas\[1\]' .* must be float"),
    ("model", "parameterization", "V", r"must be one of 'eps', 'x0', 'v', got 'V'; did you mean 'v'\?"),
    ("loss", "weighting", "minsnr", r"'loss\.weighting' .* must be one of 'simple', 'vdm', 'min_snr', 'edm', 'native'.*"
                                    r"did you mean 'min_snr'"),
    ("trainer", "precision", "fp16", r"must be one of 'auto', 'fp32', 'bf16', got 'fp16'"),
    ("trainer", "steps", 0, r"'trainer\.steps' in f\.toml must be >= 1, got 0"),
    ("data", "batch_size", -4, r"'data\.batch_size' .* must be >= 1"),
    ("trainer", "lr", 0.0, r"'trainer\.lr' .* must be > 0"),
    ("trainer", "lr", float("nan"), r"'trainer\.lr' .* must be > 0"),
    ("trainer", "ema_decay", 1.0, r"'trainer\.ema_decay' .* must be in \[0, 1\)"),
    ("trainer", "ema_decay", -0.1, r"must be in \[0, 1\)"),
    ("loss", "p_uncond", 1.0, r"'loss\.p_uncond' .* must be in \[0, 1\)"),
    ("trainer", "grad_accum", 0, r"'trainer\.grad_accum' .* must be >= 1"),
    ("trainer", "keep_last", 0, r"'trainer\.keep_last' .* must be >= 1"),
    ("data", "val_fraction", 1.0, r"'data\.val_fraction' .* must be in \[0, 1\)"),
    ("trainer", "betas", [0.9, 1.0], r"two numbers in \[0, 1\)"),
    ("trainer", "grad_clip", 0.0, r"'trainer\.grad_clip' .* must be > 0"),
    ("sample", "spacing", "linear", r"'sample\.spacing' .* must be one of uniform, quadratic, karras, logsnr"),
    ("sample", "nfe", 0, r"'sample\.nfe' .* must be in 1\.\.1000000"),
    ("model", "schedule", {"T": 10}, r"'model\.schedule' .* table with a 'name' key"),
])
def test_bad_values(section, key, value, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        config_from_dict({section: {key: value}}, source="f.toml")
    assert e.value.source == "f.toml"


def test_section_must_be_a_table():
    with pytest.raises(ConfigError, match=r"'trainer' in f\.toml must be a table of settings"):
        config_from_dict({"trainer": 3}, source="f.toml")
    with pytest.raises(ConfigError, match="the configuration in f.yaml must be a table"):
        config_from_dict([1, 2], source="f.yaml")


def test_batch_must_split_into_micro_batches():
    with pytest.raises(ConfigError, match=r"'data\.batch_size' .* multiple of 'trainer\.grad_accum' \(3\)"):
        config_from_dict({"trainer": {"grad_accum": 3}})


def test_direct_construction_is_validated():
    assert TrainerConfig(betas=[0.5, 0.6]).betas == (0.5, 0.6)
    with pytest.raises(ConfigError, match=r"'trainer\.lr' in TrainerConfig\(\.\.\.\) must be > 0"):
        TrainerConfig(lr=-1.0)
    with pytest.raises(ConfigError, match=r"must be int"):
        dataclasses.replace(Config().trainer, steps="10")


def test_syntax_errors_name_file_and_line(tmp_path):
    p = write(tmp_path, "bad.toml", "[trainer]\nlr = \nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml, line 2, column \d+: invalid TOML"):
        load_config(p)
    p = write(tmp_path, "bad.yaml", "trainer:\n  betas: [0.9\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line 3, column \d+: invalid YAML"):
        load_config(p)
    p = write(tmp_path, "dup.yml", "trainer:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    with pytest.raises(ConfigError, match=r"dup\.yml, line 3.*duplicate key 'lr'"):
        load_config(p)
    p = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml must be a table"):
        load_config(p)


def test_unknown_extension_and_missing_file(tmp_path):
    p = write(tmp_path, "c.json", "{}")
    with pytest.raises(ConfigError, match=r"c\.json.*unknown extension '\.json'; use \.toml, \.yaml or \.yml"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"nope\.toml' does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="unknown extension"):
        dump_config(Config(), tmp_path / "c.ini")


# -- overrides ---------------------------------------------------------------------------------
def test_overrides_each_value_kind():
    base = Config()
    cfg = apply_overrides(base, [
        "trainer.lr=1e-4",  # float
        "trainer.steps=32",  # int
        "trainer.compile=true",  # bool
        "data.adapter=foo",  # bare word
        'run_dir="runs/x y"',  # quoted string
        "trainer.betas=[0.9,0.95]",  # list -> tuple
        "trainer.time_budget=null",  # None
        "trainer.grad_clip=none",  # None for a set default
        "model.schedule={name = \"sigmoid\", tau = 0.5}",  # inline table
        "sample.guidance = 1",  # spaces, int for float
    ])
    t = cfg.trainer
    assert t.lr == 1e-4 and t.steps == 32 and t.compile is True and t.betas == (0.9, 0.95)
    assert t.time_budget is None and t.grad_clip is None
    assert cfg.data.adapter == "foo" and cfg.run_dir == "runs/x y"
    assert cfg.model.schedule == {"name": "sigmoid", "tau": 0.5}
    assert cfg.sample.guidance == 1.0 and isinstance(cfg.sample.guidance, float)
    assert base == Config()  # the original is untouched
    assert apply_overrides(base, []) == base


def test_overrides_keep_strings_as_strings():
    cfg = apply_overrides(Config(), ["run_dir=2024", "data.adapter=true", "run_dir=runs/2024-01-01"])
    assert cfg.run_dir == "runs/2024-01-01"
    assert apply_overrides(Config(), ["run_dir=2024"]).run_dir == "2024"
    assert apply_overrides(Config(), ["data.adapter=true"]).data.adapter == "true"


def test_overrides_new_option_keys():
    cfg = apply_overrides(Config(), ["model.options.channels=32", "model.options.mults=[1,2]",
                                     "data.options.io.chunks=4", "model.options.dropout=null"])
    assert cfg.model.options == {"channels": 32, "mults": [1, 2], "dropout": None}
    assert cfg.data.options == {"io": {"chunks": 4}}
    cfg = apply_overrides(cfg, ["model.options.channels=64"])
    assert cfg.model.options["channels"] == 64 and cfg.model.options["mults"] == [1, 2]
    # a schedule name becomes a table when one of its options is set
    assert apply_overrides(Config(), ["model.schedule.T=1000"]).model.schedule == {"name": "cosine", "T": 1000}


def test_override_whole_section_merges():
    cfg = apply_overrides(Config(), ["sample={nfe = 5, n = 2}"])
    assert cfg.sample.nfe == 5 and cfg.sample.n == 2 and cfg.sample.sampler == "dpmpp_2m"


def test_override_errors():
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), ["trainer.lrr=1"])
    assert "unknown key 'trainer.lrr' in --set trainer.lrr=1; did you mean 'trainer.lr'?" in str(e.value)
    assert e.value.key == "trainer.lrr" and e.value.source == "--set trainer.lrr=1"
    with pytest.raises(ConfigError, match=r"unknown key 'modle' in --set modle\.backbone=x; did you mean 'model'"):
        apply_overrides(Config(), ["modle.backbone=x"])
    with pytest.raises(ConfigError, match=r"'trainer\.steps' in --set trainer\.steps=1\.5 must be int"):
        apply_overrides(Config(), ["trainer.steps=1.5"])
    with pytest.raises(ConfigError, match=r"'trainer\.lr' in --set trainer\.lr=-1 must be > 0"):
        apply_overrides(Config(), ["trainer.lr=-1"])
    with pytest.raises(ConfigError, match=r"--set expects KEY=VALUE"):
        apply_overrides(Config(), ["trainer.lr"])
    with pytest.raises(ConfigError, match=r"--set expects KEY=VALUE"):
        apply_overrides(Config(), ["trainer..lr=1"])
    with pytest.raises(ConfigError, match=r"'trainer\.lr' is float, not a table"):
        apply_overrides(Config(), ["trainer.lr.x=1"])
    with pytest.raises(ConfigError, match=r"not a valid TOML value"):
        apply_overrides(Config(), ["trainer.betas=[0.9,"])
    with pytest.raises(ConfigError, match=r"'trainer' is a section"):
        apply_overrides(Config(), ["trainer=3"])
    with pytest.raises(ConfigError, match=r"'trainer\.precision' in --set trainer\.precision=fp16 must be one of"):
        apply_overrides(Config(), ["trainer.precision=fp16"])


def test_overrides_then_dump_round_trip(tmp_path):
    cfg = apply_overrides(custom(), ["trainer.lr=3e-5", "model.options.channels=16", "sample.spacing=none"])
    assert load_config(dump_config(cfg, tmp_path / "config.toml")) == cfg


# -- issue 13: names checked at config time, every typo at once, out-of-range values -------------
def test_unknown_sampler_rejected_at_config_time(tmp_path):
    """``sample.sampler = "nope"`` used to train to the end with exit 0; now loading the config fails,
    listing the registered samplers (and the spacings, for a bad spacing)."""
    p = write(tmp_path, "c.toml", '[sample]\nsampler = "nope"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "'sample.sampler'" in msg and "'nope'" in msg and str(p) in msg and e.value.key == "sample.sampler"
    for name in samplers.BUILTIN_SAMPLERS:
        assert name in msg
    with pytest.raises(ConfigError, match=r"got 'dpmpp2m'; did you mean 'dpmpp_2m'\?"):
        apply_overrides(Config(), ["sample.sampler=dpmpp2m"])
    with pytest.raises(ConfigError, match=r"'sample\.spacing' .* one of uniform, quadratic, karras, logsnr"):
        load_config(write(tmp_path, "s.toml", '[sample]\nspacing = "lin"\n'))
    # a plugin's sampler is a registered name too
    from diffkit import registry

    class Plugin:
        @staticmethod
        @__import__("diffkit").hookimpl
        def diffkit_samplers():
            return {"my_sampler": samplers.ddim}

    registry.register_plugin(Plugin(), "test_sampler_plugin")
    try:
        assert config_from_dict({"sample": {"sampler": "my_sampler"}}).sample.sampler == "my_sampler"
    finally:
        registry.unregister_plugin("test_sampler_plugin")
    # and the CLI stops before training starts: no run directory
    from diffkit.cli import main

    cfg = write(tmp_path, "t.toml", f'run_dir = "{(tmp_path / "run").as_posix()}"\n[sample]\nsampler = "nope"\n')
    assert main(["train", str(cfg), "--no-progress"]) == 1
    assert not (tmp_path / "run").exists()


def test_several_typos_reported_at_once(tmp_path):
    p = write(tmp_path, "c.toml", '[trainer]\nlrr = 1e-4\nstesp = 10\nema_decay = 2.0\n'
                                  '[smaple]\nn = 3\n[sample]\nsampler = "dpmpp2m"\nnfe = 0\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"6 problems in {p}: (1) ")
    for part in ["unknown key 'smaple'; did you mean 'sample'?", "unknown key 'trainer.lrr'; did you mean 'trainer.lr'?",
                 "unknown key 'trainer.stesp'; did you mean 'trainer.steps'?", "'trainer.ema_decay' must be in [0, 1)",
                 "'sample.nfe' must be in 1..", "got 'dpmpp2m'; did you mean 'dpmpp_2m'?"]:
        assert part in msg, part
    assert [x.key for x in e.value.errors] == ["smaple", "trainer.lrr", "trainer.stesp", "trainer.ema_decay",
                                               "sample.nfe", "sample.sampler"]
    assert e.value.key == "smaple" and e.value.source == str(p)
    # one problem is reported as before, with the valid keys
    with pytest.raises(ConfigError, match=r"^unknown key 'trainer\.lrr' in .*Valid keys in \[trainer\]"):
        load_config(write(tmp_path, "one.toml", "[trainer]\nlrr = 1\n"))


def test_out_of_range_steps_named_with_key(tmp_path):
    """Integers beyond int64 and a schedule's ``T`` are errors naming their key."""
    big = 2**70
    with pytest.raises(ConfigError, match=rf"^'trainer\.steps' in .*c\.toml is out of range: {big} does not fit "
                                          r"in a 64-bit integer"):
        load_config(write(tmp_path, "c.toml", f"[trainer]\nsteps = {big}\n"))
    with pytest.raises(ConfigError, match=r"'sample\.nfe' .* must be in 1\.\.1000000"):
        config_from_dict({"sample": {"nfe": 10**7}})
    for T, pattern in [(0, r"must be an integer in 1\.\.1000000 .* got 0"), (10**12, r"got 1000000000000"),
                       (1.5, r"must be an integer number of discrete steps \(or unset\), got 1\.5"),
                       ("10", r"got '10' \(str\)"), (big, r"got 1180591620717411303424")]:
        with pytest.raises(ConfigError, match=r"^'model\.schedule\.T' in f\.toml .*" + pattern) as e:
            config_from_dict({"model": {"schedule": {"name": "linear", "T": T}}}, source="f.toml")
        assert e.value.key == "model.schedule.T"
    with pytest.raises(ConfigError, match=r"'model\.schedule\.T' in --set model\.schedule\.T=-3"):
        apply_overrides(Config(), ["model.schedule.T=-3"])
    assert config_from_dict({"model": {"schedule": {"name": "linear", "T": 50}}}).model.schedule["T"] == 50
    # a schedule's other options are checked when the model is built, named with model.schedule
    from diffkit.layout import Layout
    from diffkit.model import build_model

    cfg = config_from_dict({"model": {"schedule": {"name": "linear", "Tt": 5}}})
    with pytest.raises(ConfigError, match=r"model\.schedule \(schedule 'linear'\): unknown option\(s\) Tt; "
                                          r"valid options: T, beta_start, beta_end"):
        build_model(cfg, Layout(channels=("a", "b")))
    cfg = config_from_dict({"model": {"schedule": {"name": "refiner", "steps": 3, "sigma_min": 2.0}}})
    with pytest.raises(ConfigError, match=r"model\.schedule .* is invalid: refiner needs"):
        build_model(cfg, Layout(channels=("a", "b")))


def test_negative_guidance_is_rejected():
    with pytest.raises(ConfigError, match=r"'sample\.guidance' .* must be >= 0 .*negative guidance is not supported.*"
                                          r"got -1\.0"):
        config_from_dict({"sample": {"guidance": -1.0}})


# -- issue 16: the schema apart from the loader, its rules beside its fields, no torch ----------------
#: every range/choice rule of the schema, with a value that breaks it and what the error says it must be
#: (the messages of the table of rules config.py had before the rules moved into field metadata)
RULES = {
    "data.val_fraction": (1.0, "in [0, 1)"),
    "data.workers": (-1, ">= 0"),
    "data.batch_size": (0, ">= 1"),
    "data.window": (1, "0 (off) or a number of states >= 2"),
    "data.mask_past": (1.5, "a probability in [0, 1]"),
    "data.mask_points": (-0.5, "a probability in [0, 1]"),
    "data.mask_both": (2.0, "a probability in [0, 1]"),
    "data.mask_fraction": ((0.6, 0.5), "[low, high] with 0 < low <= high <= 1"),
    "data.mask_noise": ((0.3, 0.1), "[0, 0] (off) or [low, high] with 0 < low <= high"),
    "model.schedule": ({"T": 10}, "a schedule name or a table with a 'name' key, like {name = \"cosine\"}"),
    "loss.p_mean": (float("inf"), "finite"),
    "loss.p_std": (0.0, "> 0 and finite"),
    "loss.sigma_min": (-1.0, "> 0 and finite"),
    "loss.sigma_max": (float("inf"), "> 0 and finite"),
    "loss.sigma_data": (0.0, "> 0 and finite"),
    "loss.gamma": (0.0, "> 0"),
    "loss.p_uncond": (1.0, "in [0, 1)"),
    "trainer.steps": (0, ">= 1"),
    "trainer.time_budget": (0.0, "> 0 seconds (or unset)"),
    "trainer.lr": (0.0, "> 0 and finite"),
    "trainer.weight_decay": (-0.1, ">= 0 and finite"),
    "trainer.betas": ((0.9, 1.0), "two numbers in [0, 1)"),
    "trainer.warmup": (-1, ">= 0"),
    "trainer.check_every": (-1, ">= 0"),
    "trainer.grad_clip": (0.0, "> 0 (or \"none\" to switch clipping off)"),
    "trainer.grad_accum": (0, ">= 1"),
    "trainer.ema_decay": (1.0, "in [0, 1)"),
    "trainer.log_every": (0, ">= 1"),
    "trainer.val_every": (-1, ">= 0 (0 = never)"),
    "trainer.val_batches": (0, ">= 1"),
    "trainer.snapshot_every": (-1, ">= 0 (0 = off)"),
    "trainer.ckpt_every": (-1, ">= 0 (0 = only at the end)"),
    "trainer.keep_last": (0, ">= 1"),
    "sample.nfe": (1_000_001, "in 1..1000000 (the number of denoiser calls)"),
    "sample.spacing": ("linear", "one of uniform, quadratic, karras, logsnr (or unset)"),
    "sample.n": (0, ">= 1"),
    "sample.guidance": (-1.0, ">= 0 and finite (or unset; negative guidance is not supported: 0 is the "
                              "unconditional model, 1 the conditional one)"),
}


def test_range_rules_sit_in_field_metadata():
    """Each range or choice rule is in the metadata of its field (no table apart), and each one is
    enforced with its own message when a dict is read."""
    from diffkit import _typed

    found = {}
    for name, cls in _typed.hints(Config).items():
        for f in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
            rule = _typed._rule(f, _typed.hints(cls)[f.name])
            if rule is not None:
                found[f"{name}.{f.name}"] = rule.describe()
    assert found == {key: what for key, (_, what) in RULES.items()}
    for key, (bad, what) in RULES.items():
        section, name = key.split(".")
        with pytest.raises(ConfigError) as e:
            config_from_dict({section: {name: list(bad) if isinstance(bad, tuple) else bad}})
        assert str(e.value) == f"{key!r} in <dict> must be {what}, got {bad!r}", key
        assert e.value.key == key


def test_config_imports_neither_torch_nor_the_samplers():
    """diffkit.config (and the loader and documentation modules it uses) import no torch and no
    diffkit.samplers: loaded in a fresh interpreter under a bare `diffkit` package object (diffkit's own
    __init__ imports the engine, and so torch), a Config is built, read, documented and written."""
    import subprocess
    import sys
    from pathlib import Path

    import diffkit
    code = ("import sys, types, tempfile, pathlib; p = types.ModuleType('diffkit'); p.__path__ = [%r]; "
            "sys.modules['diffkit'] = p; import diffkit.config as c; "
            "cfg = c.apply_overrides(c.Config(), ['sample.sampler=heun', 'sample.spacing=karras']); "
            "d = pathlib.Path(tempfile.mkdtemp()); assert c.load_config(c.dump_config(cfg, d / 'c.toml')) == cfg; "
            "c.format_config_markdown(); "
            "print(sorted(m for m in ('torch', 'diffkit.samplers', 'diffkit.registry', 'numpy') "
            "if m in sys.modules))"
            % str(Path(diffkit.__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_sampler_constants_are_shared_with_the_samplers():
    """The sampler constants config.py checks against are the samplers' own (diffkit.constants)."""
    from diffkit import constants

    assert samplers.SPACINGS is constants.SPACINGS and samplers.MAX_NFE == constants.MAX_NFE
    assert constants.BUILTIN_SAMPLER_NAMES == tuple(samplers.BUILTIN_SAMPLERS)


def test_documentation_rendering_is_its_own_module():
    """diffkit.config_docs renders the help and docs/config.md; config.py only passes its Config."""
    from diffkit import config_docs

    assert config_docs.format_markdown(Config) == format_config_markdown()
    assert config_docs.format_help(Config, 70) == format_config_help(width=70)
    assert config_docs.describe(Config) == describe()
