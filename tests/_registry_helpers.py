"""Helpers shared by tests/test_registry.py and tests/test_testing.py (issue 16: one copy): the core
components every install registers, the plugin environment switches, and a fresh-interpreter runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from diffkit import registry


CORE = {
    "schedule": {"linear", "cosine", "sigmoid", "alpha_bar", "refiner"},
    "sampler": {"ddpm", "ddim", "dpmpp_2m", "dpmpp_2s", "dpmpp_3m", "euler", "heun", "unipc"},
    "metric": {"sliced_wasserstein", "ensemble_mean_rmse", "ensemble_spread", "ensemble_spread_skill_ratio",
               "ensemble_crps", "ensemble_rank_histogram"},
    "adapter": {"mixture"},
    "guidance": {"dps", "reconstruction", "mmps"},
}
#: the environment switches of plugin loading, which a test must not inherit
ENV_VARS = ("DIFFKIT_DISABLE_PLUGIN_AUTOLOAD", "DIFFKIT_PLUGINS")


def names(kind: str) -> set[str]:
    return {c.name for c in registry.components(kind)}


def owner(kind: str, name: str) -> str:
    return {c.name: c.plugin for c in registry.components(kind)}[name]


def _run_python(code: str, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
