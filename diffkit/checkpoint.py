"""Checkpoints: one file holds everything needed to resume training or to sample.

A checkpoint is a ``torch.save`` zip archive of one dict::

    {"format": "diffkit-checkpoint", "format_version": 1, "diffkit_version": "0.1.0",
     **payload}

The payload is free-form (model and EMA weights, optimiser, LR scheduler, step, RNG states,
layout, resolved config, ...) but may hold only tensors and plain data (dict, list, tuple,
set, str, bytes, numbers, bool, None, ``torch.dtype``/``torch.device``/``torch.Size``), so that
every checkpoint loads with ``torch.load(weights_only=True)``: diffkit never unpickles code.
:func:`capture_rng_state` and :func:`generator_state` turn RNG states into such data and
``Layout.to_dict()`` does the same for the adapter layout.

Writing is atomic (temp file in the same directory, flush, fsync, rename, fsync of the
directory): a crash or a full disk never leaves a partial file under a checkpoint's name and
never touches the checkpoints already there.  :class:`CheckpointManager` keeps the last N and
finds the latest valid one for ``--resume``.
"""
from __future__ import annotations

import collections
import errno
import operator
import os
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from .errors import CheckpointError

__all__ = [
    "FORMAT", "FORMAT_VERSION", "CheckpointError", "CheckpointManager", "capture_rng_state",
    "generator_state", "load_checkpoint", "restore_rng_state", "resume", "save_checkpoint",
    "set_generator_state",
]

FORMAT = "diffkit-checkpoint"
"""Value of the ``"format"`` key that marks a diffkit checkpoint."""
FORMAT_VERSION = 1
"""Newest checkpoint format this diffkit writes and reads."""
MIN_FORMAT_VERSION = 1
"""Oldest checkpoint format this diffkit reads."""
_MARKER_KEYS = ("format", "format_version", "diffkit_version")
_ZIP_MAGIC = b"PK\x03\x04"
_RESUME_HINT = "use an earlier checkpoint (--resume / CheckpointManager.latest_valid picks the latest valid one)"


def _diffkit_version() -> str:
    from . import __version__  # late: diffkit/__init__ may import this module

    return __version__


# --------------------------------------------------------------------------------------
# RNG states as plain data
# --------------------------------------------------------------------------------------
def capture_rng_state(*, cuda: bool | None = None) -> dict:
    """Every global RNG state as tensors and plain data (safe for ``weights_only`` loading).

    Returns ``{"python": ..., "numpy": ..., "torch": ByteTensor, "cuda": [ByteTensor, ...]}``.
    ``cuda=None`` captures the CUDA states of all devices when CUDA is available (this
    initialises CUDA); ``False`` skips them.  Restore with :func:`restore_rng_state`.
    A data-loader sampler with its own ``torch.Generator`` needs :func:`generator_state` too.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    if cuda is None:
        cuda = torch.cuda.is_available()
    return {
        "python": {"version": int(version), "state": [int(v) for v in internal],
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state().clone(),
        "cuda": [s.clone() for s in torch.cuda.get_rng_state_all()] if cuda else [],
    }


def _byte_state(state: Any, what: str) -> torch.Tensor:
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.ndim != 1:
        raise CheckpointError(
            f"{what} must be a 1-D uint8 tensor, got {type(state).__name__}"
            f"{f' {state.dtype} {tuple(state.shape)}' if isinstance(state, torch.Tensor) else ''}; "
            "pass a state made by capture_rng_state / generator_state"
        )
    return state.detach().to("cpu")


def restore_rng_state(state: Mapping) -> None:
    """Set the global RNGs from :func:`capture_rng_state`'s dict (entries not present are left alone).

    CUDA states are restored for ``min(saved, available)`` devices; a warning says when the
    counts differ (for example a GPU checkpoint resumed on a CPU-only machine).
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"an RNG state must be a dict from capture_rng_state, got {type(state).__name__}")
    try:
        if "python" in state:
            p = state["python"]
            random.setstate((int(p["version"]), tuple(int(v) for v in p["state"]),
                             None if p["gauss_next"] is None else float(p["gauss_next"])))
        if "numpy" in state:
            n = state["numpy"]
            keys = n["keys"]
            keys = keys.cpu().numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
            np.random.set_state((str(n["kind"]), keys.astype(np.uint32), int(n["pos"]),
                                 int(n["has_gauss"]), float(n["cached_gaussian"])))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"the saved RNG state is malformed ({type(e).__name__}: {e}); "
            "it must come from diffkit.checkpoint.capture_rng_state"
        ) from None
    if "torch" in state:
        torch.set_rng_state(_byte_state(state["torch"], "the torch CPU RNG state"))
    saved = list(state.get("cuda") or [])
    if saved:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have != len(saved):
            warnings.warn(
                f"the checkpoint holds CUDA RNG states for {len(saved)} device(s) but {have} "
                f"{'is' if have == 1 else 'are'} available; restoring {min(have, len(saved))}, "
                "so CUDA random numbers will not repeat the original run exactly",
                stacklevel=2,
            )
        for i, s in enumerate(saved[:have]):
            torch.cuda.set_rng_state(_byte_state(s, f"the CUDA RNG state of device {i}"), device=i)


def generator_state(gen: torch.Generator) -> dict:
    """The state of one ``torch.Generator`` (e.g. a data-loader sampler's) as plain data."""
    return {"device": str(gen.device), "state": gen.get_state().clone()}


def set_generator_state(gen: torch.Generator, state: Mapping | torch.Tensor) -> torch.Generator:
    """Restore a generator from :func:`generator_state` (or from a raw ``get_state()`` tensor)."""
    if isinstance(state, Mapping):
        dev = state.get("device")
        if dev is not None and torch.device(dev).type != gen.device.type:
            raise CheckpointError(
                f"the saved generator state is for a {torch.device(dev).type} generator but the generator "
                f"to restore is on {gen.device.type}; create the generator on {torch.device(dev).type}"
            )
        state = state.get("state")
    gen.set_state(_byte_state(state, "a generator state"))
    return gen


# --------------------------------------------------------------------------------------
# payload check: only what torch.load(weights_only=True) accepts
# --------------------------------------------------------------------------------------
_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device)
_MAPPINGS = (dict, collections.OrderedDict, collections.Counter)
_SEQUENCES = (list, tuple, torch.Size, set)


def _check_payload(obj: Any, where: str, seen: set) -> None:
    t = type(obj)
    if t in _LEAVES or t is torch.Tensor or t is torch.nn.Parameter:
        return
    if t in _MAPPINGS or t in _SEQUENCES:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if t in _MAPPINGS:
            for k, v in obj.items():
                _check_payload(k, f"{where} key {k!r}", seen)
                _check_payload(v, f"{where}[{k!r}]", seen)
        else:
            for i, v in enumerate(obj):
                _check_payload(v, f"{where}[{i}]", seen)
        return
    hint = ""
    if isinstance(obj, np.ndarray):
        hint = " (convert numpy arrays with torch.from_numpy)"
    elif isinstance(obj, np.generic):
        hint = " (convert numpy scalars with .item())"
    elif isinstance(obj, torch.Tensor):
        hint = " (convert tensor subclasses with x.as_subclass(torch.Tensor))"
    elif hasattr(obj, "to_dict"):
        hint = " (store obj.to_dict() instead)"
    elif isinstance(obj, (dict, list, tuple)):
        hint = " (convert dict/list/tuple subclasses such as namedtuples to plain dict/list/tuple)"
    raise TypeError(
        f"{where} is a {t.__module__}.{t.__qualname__}; checkpoints hold only tensors and plain data "
        f"(dict, list, tuple, set, str, bytes, numbers, bool, None) so that they load with "
        f"weights_only=True{hint}"
    )


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
def _unlink(path: Path, message, stacklevel: int) -> None:
    """Delete ``path``; gone already is fine, any other OSError a warning ``message(error)`` (nothing is
    raised: the caller's own result or error matters more than a file left behind)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        warnings.warn(message(e), stacklevel=stacklevel)


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems do not support fsync on directories
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM):
            raise
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, payload: Mapping) -> Path:
    """Write ``payload`` (plus the format marker) to ``path`` atomically; return the path.

    The data goes to ``.<name>.tmp-<pid>`` in the same directory, is flushed and fsync'ed, and
    only then renamed onto ``path`` (then the directory is fsync'ed).  On any failure the temp
    file is removed and :class:`CheckpointError` is raised; ``path`` and every other checkpoint
    are left as they were.  Marker keys in ``payload`` (e.g. from a loaded checkpoint) are
    replaced by the current ones.
    """
    path = Path(path)
    if not isinstance(payload, Mapping):
        raise CheckpointError(
            f"could not write checkpoint {path}: the payload must be a dict, got {type(payload).__name__}; "
            "the previous checkpoints are untouched"
        )
    obj = {k: v for k, v in payload.items() if k not in _MARKER_KEYS}
    try:
        _check_payload(obj, "payload", set())
    except TypeError as e:
        raise CheckpointError(f"could not write checkpoint {path}: {e}; the previous checkpoints are untouched") from None
    obj = {"format": FORMAT, "format_version": FORMAT_VERSION, "diffkit_version": _diffkit_version(), **obj}

    for d in (path.parent, *path.parent.parents):  # before the temp file's name can show up in an error
        if d.exists():
            if not d.is_dir():
                raise CheckpointError(
                    f"could not write checkpoint {path}: {d} is a file, not a directory; move the file away "
                    "or write the checkpoints elsewhere; the previous checkpoints are untouched")
            break
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    replaced = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        replaced = True
        _fsync_dir(path.parent)
    except BaseException as e:
        # measured before the temp file is removed, which frees what it had taken
        full = isinstance(e, Exception) and _disk_full(e, path.parent)
        if not replaced:
            _unlink(tmp, lambda ue: f"could not remove the temporary file {tmp}: {ue}; delete it by hand", 3)
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: clean up, then let it through
            raise
        if full and not replaced:
            raise CheckpointError(
                f"could not write checkpoint {path}: disk full ({full}); free some disk space (or lower "
                "trainer.keep_last) and resume with --resume; the previous checkpoints are untouched"
            ) from e
        if isinstance(e, OSError):  # the error names the checkpoint, not the temp file
            named = e.filename is not None and str(e.filename) not in (str(tmp), str(path))
            reason = f"{e.strerror or str(e) or type(e).__name__}{f': {e.filename}' if named else ''}"
        else:
            reason = f"{type(e).__name__}: {e}"
        if replaced:
            raise CheckpointError(
                f"checkpoint {path} was written but its directory could not be synced to disk ({reason}); "
                "it may not survive a power failure"
            ) from e
        raise CheckpointError(
            f"could not write checkpoint {path}: {reason}; the previous checkpoints are untouched"
        ) from e
    return path


#: errno values that mean "no room left": the disk, or the user's quota
_NO_SPACE = tuple(getattr(errno, n) for n in ("ENOSPC", "EDQUOT") if hasattr(errno, n))
#: torch.save's writer checks the position after every record: a short write (a full disk whose
#: ENOSPC was swallowed on the way) surfaces as "[enforce fail at inline_container.cc] ... unexpected pos"
_TORCH_SHORT_WRITE = re.compile(r"unexpected pos|inline_container|PytorchStreamWriter failed writing")
#: below this much free space a torch short write is taken for a full disk
_NEARLY_FULL = 1 << 20


def _disk_full(e: BaseException, directory: Path) -> str:
    """``"<free> free on <directory>"`` when ``e`` means the disk (or quota) is full, else ``""``.

    torch does not pass ENOSPC on: writing to a full disk raises ``RuntimeError: [enforce fail at
    inline_container.cc:...] . unexpected pos ...``, with the file's ``OSError`` (if any) only in the
    exception's context.  So: an ENOSPC/EDQUOT anywhere in the chain, or a torch short write while
    the directory has (almost) no free space left.
    """
    chain, seen, cur = [], set(), e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    no_space = [x for x in chain if isinstance(x, OSError) and x.errno in _NO_SPACE]
    short_write = any(isinstance(x, RuntimeError) and _TORCH_SHORT_WRITE.search(str(x)) for x in chain)
    if not (no_space or (short_write and free is not None and free < _NEARLY_FULL)):
        return ""
    where = f"{_format_bytes(free)} free on {directory}" if free is not None else f"on {directory}"
    return f"{no_space[0].strerror or os.strerror(no_space[0].errno)}; {where}" if no_space else where


def _format_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------
_REFUSAL = re.compile(
    r"Unsupported global|unsupported GLOBAL|reduce for unrecognized function|Can only create new object"
    r"|Can only build|must be imported to load|is blocked"
)

_DEVICE_PROBLEM = re.compile(
    r"deserialize object on|restore data location|not compiled with|Invalid device|device ordinal|"
    r"no CUDA GPUs|CUDA (error|driver)|out of memory", re.IGNORECASE
)


def _refusal_detail(msg: str) -> str:
    m = re.search(r"GLOBAL (\S+)", msg)
    if m:
        return f"it references {m.group(1)}"
    m = re.search(r"(reduce for unrecognized function [^\n]*|Can only [^\n]*)", msg)
    return m.group(1).strip() if m else "objects weights_only=True does not allow"


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    if first.startswith("Weights only load failed"):
        # torch's wrapper message; the WeightsUnpickler's own reason is the last non-empty line before docs
        lines = [ln for ln in msg if ln.strip() and not ln.startswith("Check the documentation")]
        first = lines[-1] if lines else first
    first = re.sub(r"\s*This is an internal.*$|\s*\(this is an internal.*$", "", first)
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def _zip_problem(path: Path, verify: bool) -> tuple[str, str] | None:
    """``("corrupt"|"foreign", reason)`` for a zip file that is broken or is not a torch archive."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
                return "foreign", "a zip archive that was not written by torch.save"
            if verify:
                bad = z.testzip()
                if bad is not None:
                    return "corrupt", f"CRC mismatch in archive member {bad}"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError, RuntimeError) as e:
        return "corrupt", f"{type(e).__name__}: {e}"
    return None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, require: Iterable[str] = (),
                    verify: bool = True) -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)`` and check its format marker.

    ``require`` names payload keys that must be present (e.g. ``("model",)`` to sample,
    ``("model", "optimizer", "step")`` to resume).  ``verify`` checks the CRC of every archive
    member first (reads the file twice; detects bit rot that torch.load does not).

    Raises :class:`CheckpointError`, naming the file, the problem and the fix, when the file is
    missing, empty, truncated or corrupt, not a diffkit checkpoint, contains objects other than
    tensors and plain data (which are never unpickled), was written by a newer diffkit, or lacks
    a required key.  Nothing is ever written.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise CheckpointError(
                f"checkpoint {path} is a directory; pass a checkpoint file, or the directory to --resume "
                "(CheckpointManager(dir).latest_valid()) to pick its latest valid checkpoint"
            )
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path} does not exist; check the path (or pass the run directory to --resume "
            "to pick its latest valid checkpoint)"
        ) from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e.strerror or e}; check its permissions") from None
    if size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes): the write was interrupted (crash or full disk); {_RESUME_HINT}"
        )
    is_zip = head.startswith(_ZIP_MAGIC)
    if not is_zip and len(head) < len(_ZIP_MAGIC) and _ZIP_MAGIC.startswith(head):
        raise CheckpointError(f"checkpoint {path} is truncated ({size} bytes); {_RESUME_HINT}")
    if is_zip:
        problem = _zip_problem(path, verify)
        if problem is not None:
            kind, reason = problem
            if kind == "foreign":
                raise CheckpointError(
                    f"{path} is not a diffkit checkpoint (foreign file: {reason}); pass a file written by "
                    "diffkit (save_checkpoint / CheckpointManager)"
                )
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason}); {_RESUME_HINT}")

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes a CheckpointError that names the file
        msg = str(e)
        if _REFUSAL.search(msg):
            raise CheckpointError(
                f"diffkit refuses to unpickle {path}: the file contains objects other than tensors and plain "
                f"data ({_refusal_detail(msg)}); diffkit never unpickles untrusted code (it loads with "
                "weights_only=True); use a checkpoint written by diffkit"
            ) from None
        if _DEVICE_PROBLEM.search(msg):
            raise CheckpointError(
                f"checkpoint {path} cannot be loaded with map_location={map_location!r} ({_short(e)}); "
                "the file is fine: load it with map_location='cpu' or a device this machine has"
            ) from None
        if not is_zip:
            raise CheckpointError(
                f"{path} is not a diffkit checkpoint (foreign file: not a torch zip archive, it starts with "
                f"{head!r}; {_short(e)}); pass a file written by diffkit (save_checkpoint / CheckpointManager)"
            ) from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({_short(e)}); {_RESUME_HINT}") from None

    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        what = (f"a {type(obj).__name__}" if not isinstance(obj, dict)
                else f"a dict without the \"format\": {FORMAT!r} marker (keys: {sorted(map(str, obj))[:8]})")
        raise CheckpointError(
            f"{path} is not a diffkit checkpoint (foreign file: a torch file holding {what}); pass a file "
            "written by diffkit (save_checkpoint / CheckpointManager)"
        )
    fv = obj.get("format_version")
    written_by = obj.get("diffkit_version", "an unknown version")
    if type(fv) is not int:
        raise CheckpointError(
            f"checkpoint {path} has an invalid format_version {fv!r}; the file is corrupt; {_RESUME_HINT}"
        )
    if fv > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} was written by a newer diffkit ({written_by}, format {fv}); this diffkit "
            f"{_diffkit_version()} reads formats up to {FORMAT_VERSION}; upgrade diffkit"
        )
    if fv < MIN_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {fv} (diffkit {written_by}), which this diffkit "
            f"{_diffkit_version()} no longer reads (formats {MIN_FORMAT_VERSION}..{FORMAT_VERSION}); load and "
            "re-save it with an older diffkit"
        )
    if isinstance(require, str):
        require = (require,)
    missing = [k for k in require if k not in obj]
    if missing:
        have = sorted(str(k) for k in obj if k not in _MARKER_KEYS)
        raise CheckpointError(
            f"checkpoint {path} lacks the required entries {missing} (it holds {have}); use a checkpoint "
            "saved with them (training checkpoints hold model, ema, optimizer, scheduler, step, rng, layout, config)"
        )
    return obj


# --------------------------------------------------------------------------------------
# a directory of checkpoints
# --------------------------------------------------------------------------------------
class CheckpointManager:
    """``<directory>/<prefix>-<step:09d>.pt`` files: atomic saves, keep the last N, resume from the latest valid.

    Only files matching that pattern are ever listed or deleted.  Temp files left by a crash
    (``.<prefix>-*.pt.tmp-<pid>``) are ignored, and removed on the next save when the process
    that wrote them is gone.
    """

    def __init__(self, directory: str | os.PathLike, keep_last: int | None = 3, prefix: str = "ckpt"):
        if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
            raise ValueError(f"keep_last must be an int >= 1 (or None to keep all), got {keep_last!r}")
        if not prefix or "/" in prefix or os.sep in prefix:
            raise ValueError(f"prefix must be a non-empty file-name prefix, got {prefix!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.prefix = prefix
        self._pattern = re.compile(rf"{re.escape(prefix)}-(\d+)\.pt")
        self._tmp_pattern = re.compile(rf"\.{re.escape(prefix)}-\d+\.pt\.tmp-(\d+)")

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.directory)!r}, keep_last={self.keep_last}, prefix={self.prefix!r})"

    def path_for(self, step: int) -> Path:
        return self.directory / f"{self.prefix}-{int(step):09d}.pt"

    def list(self) -> list[tuple[int, Path]]:
        """``[(step, path), ...]`` of the checkpoint files present, sorted by step (oldest first)."""
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            m = self._pattern.fullmatch(e.name)
            if m and e.is_file():
                out.append((int(m.group(1)), Path(e.path)))
        return sorted(out)

    def save(self, step: int, payload: Mapping) -> Path:
        """Write ``payload`` as the checkpoint of ``step`` (atomically), then prune old ones.

        ``payload["step"]`` is set to ``step`` when absent (and must equal it when present).
        Older checkpoints beyond ``keep_last`` are deleted only after the new one is safely on
        disk; the one just written is never deleted.
        """
        step = int(step.item()) if isinstance(step, torch.Tensor) else operator.index(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        payload = dict(payload)
        if "step" in payload and int(payload["step"]) != step:
            raise ValueError(f"payload['step'] = {payload['step']} differs from step = {step}")
        payload.setdefault("step", step)
        path = save_checkpoint(self.path_for(step), payload)
        self._clean_temp_files()
        self._prune(keep=path)
        return path

    def _prune(self, keep: Path) -> None:
        if self.keep_last is None:
            return
        found = self.list()
        for _, p in found[: max(0, len(found) - self.keep_last)]:
            if p == keep:
                continue
            _unlink(p, lambda e: f"could not delete the old checkpoint {p}: {e.strerror or e}", 4)

    def _clean_temp_files(self) -> None:
        if os.name != "posix":  # os.kill(pid, 0) is not a liveness probe elsewhere
            return
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return
        for e in entries:
            m = self._tmp_pattern.fullmatch(e.name)
            if not m:
                continue
            pid = int(m.group(1))
            if pid == os.getpid() or _pid_alive(pid):
                continue  # possibly being written right now
            try:
                os.unlink(e.path)
            except OSError:
                pass

    def latest_valid(self, require: Iterable[str] = (), map_location: Any = "cpu") -> tuple[Path, dict] | None:
        """The newest checkpoint that loads, as ``(path, checkpoint)``; ``None`` if there are none.

        Files that fail to load (truncated, corrupt, foreign, too new, lacking ``require``) are
        skipped with a warning naming each and why.  If checkpoint files exist but none loads,
        raises :class:`CheckpointError` rather than silently starting from scratch.
        """
        found = self.list()
        reasons = []
        for _, p in reversed(found):
            try:
                return p, load_checkpoint(p, map_location=map_location, require=require)
            except CheckpointError as e:
                reasons.append(f"{p.name}: {e}")
                warnings.warn(f"skipping checkpoint {p}: {e}", stacklevel=2)
        if found:
            raise CheckpointError(
                f"none of the {len(found)} checkpoints in {self.directory} can be loaded:\n  "
                + "\n  ".join(reasons)
                + "\nstart without --resume, or point --resume at a valid checkpoint file"
            )
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def resume(path: str | os.PathLike, *, require: Iterable[str] = (), prefix: str = "ckpt",
           map_location: Any = "cpu") -> tuple[Path, dict] | None:
    """What ``--resume PATH`` loads: the file itself, or a directory's latest valid checkpoint.

    Returns ``(path, checkpoint)``, or ``None`` for a directory without checkpoints.
    """
    p = Path(path)
    if p.is_dir():
        return CheckpointManager(p, prefix=prefix).latest_valid(require=require, map_location=map_location)
    return p, load_checkpoint(p, map_location=map_location, require=require)
