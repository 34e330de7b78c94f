"""``diffkit quickstart``: the main job on built-in data, with no configuration.

Every installed domain contributes a section through the ``diffkit_quickstarts`` hook (the
built-in PDE, weather and image plugins, and any third-party plugin that implements it).
Each section simulates or loads its built-in data, trains a small model, samples or forecasts
with it and scores the result, writing netCDF / PNG outputs into a folder of its own.  The
runner collects the sections into ``report.md`` (and ``report.json``) in the output folder::

    diffkit quickstart                         # everything, into ./diffkit-quickstart/
    diffkit quickstart --only pde,weather --out qs

A section that fails stops the run with an error naming it; the report written so far stays.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import registry
from ._io import atomic_write
from .hookspecs import hookimpl

__all__ = ["Section", "run", "write_report"]


@dataclass
class Section:
    """One domain's part of the quickstart report.

    ``rows`` are ``(metric, value, what it means / the reference)`` triples, shown as a table;
    ``figures`` (PNG) are embedded in ``report.md`` and ``files`` listed, both as paths.
    """

    title: str
    summary: str
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _sections(only):
    comps = {c.name: c for c in registry.components("quickstart")}
    if not comps:
        raise RuntimeError("no quickstart sections are registered; are diffkit's built-in plugins installed "
                           "(pip install -e .)? `diffkit plugins --kind quickstart` lists them")
    if only:
        unknown = [n for n in only if n not in comps]
        if unknown:
            raise ValueError(f"unknown quickstart section(s) {', '.join(unknown)}; the registered ones are "
                             f"{', '.join(sorted(comps))}")
        return [comps[n] for n in only]
    return [comps[n] for n in sorted(comps)]


def run(out: str | os.PathLike = "diffkit-quickstart", *, only=None, seed: int = 0, progress: bool = True,
        log=print) -> Path:
    """Run the registered quickstart sections into ``out``; returns the path of ``report.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    comps = _sections(list(only) if only else None)
    done: list[tuple[str, Section]] = []
    t0 = time.time()
    for comp in comps:
        log(f"diffkit quickstart: {comp.name} ({comp.description})")
        t = time.time()
        try:
            sec = comp.obj(out / comp.name, seed=seed, progress=progress)
        except Exception as e:
            raise RuntimeError(f"quickstart section {comp.name!r} (plugin {comp.plugin!r}) failed: "
                               f"{type(e).__name__}: {e}") from e
        if not isinstance(sec, Section):
            raise TypeError(f"quickstart section {comp.name!r} of plugin {comp.plugin!r} returned "
                            f"{type(sec).__name__}, expected diffkit.quickstart.Section")
        sec.seconds = time.time() - t
        done.append((comp.name, sec))
        report = write_report(out, done, total=time.time() - t0, seed=seed)  # finished sections survive a failure
        log(f"diffkit quickstart: {comp.name} done in {sec.seconds:.0f} s")
    log(f"diffkit quickstart: report in {report} ({time.time() - t0:.0f} s in all)")
    return report


def _rel(p, out: Path) -> str:
    p = Path(p)
    try:
        return p.resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return str(p)


def write_report(out: Path, sections: list[tuple[str, Section]], *, total: float, seed: int) -> Path:
    """Write ``report.md`` and ``report.json`` (atomically) for the finished ``sections``."""
    import platform

    import torch

    lines = ["# diffkit quickstart report", "",
             f"Every section trained a small model from scratch on built-in data ({total:.0f} s in all, "
             f"seed {seed}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
             f"Python {platform.python_version()}).  The numbers come from this run; they are small-budget "
             "results meant to show the workflow, not the benchmarks (see docs/benchmarks.md).", ""]
    for name, s in sections:
        lines += [f"## {s.title}", "", s.summary.strip(), "", f"*Section `{name}`, {s.seconds:.0f} s.*", ""]
        if s.rows:
            lines += ["| metric | value | meaning |", "|---|---|---|"]
            lines += [f"| {a} | {b} | {c} |" for a, b, c in s.rows] + [""]
        for f in s.figures:
            lines += [f"![{Path(f).stem}]({_rel(f, out)})", ""]
        if s.files:
            lines += ["Files: " + ", ".join(f"`{_rel(f, out)}`" for f in s.files), ""]
    atomic_write(out / "report.md", lambda fh: fh.write("\n".join(lines)))
    js = {"total_s": total, "seed": seed,
          "sections": {n: {**{k: v for k, v in asdict(s).items() if k not in ("figures", "files")},
                           "figures": [_rel(f, out) for f in s.figures], "files": [_rel(f, out) for f in s.files]}
                       for n, s in sections}}
    atomic_write(out / "report.json", lambda fh: json.dump(js, fh, indent=1, default=float))
    return out / "report.md"


def register(parser) -> None:
    """train small models on built-in data in every domain and write outputs and a report (a few minutes)"""
    parser.add_argument("--out", default="diffkit-quickstart", help="output folder (default: ./diffkit-quickstart)")
    parser.add_argument("--only", default=None, help="comma-separated sections to run (default: all registered; "
                        "`diffkit plugins --kind quickstart` lists them)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the training and the sampling")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=_cmd)


def _cmd(args) -> int:
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    run(args.out, only=only, seed=args.seed, progress=not args.no_progress)
    return 0


@hookimpl
def diffkit_commands():
    """``diffkit quickstart``, registered as a built-in plugin (:mod:`diffkit._builtins`)."""
    return {"quickstart": register}
