"""Training-step throughput, peak memory and MFU of diffkit's UNet and DiT against diffusers.

    python benchmarks/backbones.py                       # CPU: batch 8, eager, fp32 + bf16
    python benchmarks/backbones.py --device cuda --compile --markdown /tmp/backbones.md

Three networks of (about) the same size train on random 3x32x32 data:

- ``diffusers``: ``UNet2DModel`` in the configuration of ``google/ddpm-cifar10-32`` (the DDPM
  CIFAR-10 network, 35.7M parameters);
- ``unet``: diffkit's UNet with the DDPM CIFAR-10 preset (``channels=128,
  channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,)``; 38.4M, FiLM makes it
  7% larger);
- ``dit``: diffkit's DiT, patch 2, ``hidden=512, depth=7, num_heads=8`` (34.0M; a block
  with adaLN-zero has 18 hidden^2 weights, so hidden 512 at depth 10-12 would be 48-58M).

Parameter counts are printed and must lie within +-10% of diffusers'.  Every network takes the
*same* training step: draw ``n ~ U{0..999}`` and ``eps``, ``x_t = sqrt(ab_n) x0 + sqrt(1-ab_n)
eps`` (linear DDPM schedule from :func:`diffkit.linear`), forward (diffusers:
``model(x_t, n).sample``; diffkit: ``net(x_t, logsnr_n)``, the backbone called directly as
:class:`diffkit.Denoiser` would), simple eps-MSE, backward, AdamW step, ``zero_grad(set_to_none)``.

Measured, per network x dtype (fp32; bf16 = ``torch.autocast``) x mode (eager; with
``--compile`` also ``torch.compile(model)``):

- **throughput**: samples/s of the median step time.  Runs are interleaved (A B C A B C ...)
  after warm-up so machine noise hits all alike; "spread" is (max - min) / median.
- **peak memory**: CUDA: bytes held by the network (parameters, buffers, AdamW state) plus the
  rise of ``torch.cuda.max_memory_allocated`` over the step (so models benchmarked side by side
  do not count each other).  CPU: growth of the peak RSS (``VmHWM``) of a fresh subprocess
  that builds the network and takes two steps, eager only (includes allocator and oneDNN
  caches; ``--cpu-memory off`` skips it).
- **MFU**: model FLOPs of one step (forward + backward, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` in eager fp32, attention included) times steps/s,
  over the peak given by ``--peak-tflops``.  On CUDA the default peaks are the dense H100/H200
  SXM figures: 989 TFLOP/s bf16, 494 TFLOP/s for fp32 with TF32 (on by default here;
  ``--no-tf32``: 67).  On CPU only the achieved GFLOP/s is reported unless ``--peak-tflops``
  is given.

2-D convolution nets (unet, diffusers) run in contiguous or channels_last memory format.
``--channels-last auto`` (default): on CPU both formats are timed as separate rows (a trial
would cost as much), on CUDA a short eager trial picks one per network; ``both``/``on``/``off``
force it.  Each network's faster format (marked ``*``, and printed) is used for the ratios
diffkit/diffusers, which compare the same dtype and mode.  Targets (for an H100/H200 run):
unet >= 2x diffusers' throughput; dit >= 55% MFU.  The script exits with status 0 unless the
parameter check fails.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import diffkit as dk
from diffkit.layout import Layout

MODELS = ("unet", "dit", "diffusers")
CONV_MODELS = ("unet", "diffusers")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}

#: ``google/ddpm-cifar10-32`` ``config.json`` (diffusers' port of Ho et al. 2020's CIFAR-10 net).
DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", freq_shift=1, flip_sin_to_cos=False,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(128, 256, 256, 256), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=0, act_fn="silu", attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6,
)
DDPM_CIFAR10_PARAMS = 35_746_307  # for the check when diffusers is not installed
UNET_OPTS = dict(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,), dropout=0.0)
#: Dense peak TFLOP/s of an H100/H200 SXM (the defaults on CUDA).
GPU_PEAKS = {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}
T = 1000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- networks ----------------------------------------------------------------------------------
def layout() -> Layout:
    return Layout(channels=("r", "g", "b"), spatial=("y", "x"), shape=(32, 32))


def dit_opts(args) -> dict:
    return dict(hidden=args.dit_hidden, depth=args.dit_depth, num_heads=args.dit_heads, patch_size=2)


def build(name: str, args) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "diffusers":
        from diffusers import UNet2DModel
        return UNet2DModel(**DDPM_CIFAR10)
    from diffkit_backbones import build_dit, build_unet
    if name == "unet":
        return build_unet(layout(), **UNET_OPTS)
    return build_dit(layout(), **dit_opts(args))


def nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class Tables:
    """Per-timestep coefficients of the linear DDPM schedule (diffkit's), on the device."""

    def __init__(self, device):
        sch = dk.linear(T)
        t = sch.discrete_times()
        a, s = sch.coeffs(t)
        self.a = a.to(device, torch.float32)
        self.s = s.to(device, torch.float32)
        self.logsnr = sch.logsnr(t).clamp(-30, 30).to(device, torch.float32)  # as Denoiser.net_output


def forward_fn(name: str, model, tabs: Tables):
    if name == "diffusers":
        return lambda xt, n: model(xt, n).sample
    return lambda xt, n: model(xt, tabs.logsnr[n])


def make_optimizer(model, device):
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4), "default"


def train_step(fwd, opt, x0, tabs: Tables, amp_dtype, gen) -> None:
    """One step: noise, forward (under autocast for bf16), eps-MSE, backward, AdamW, zero_grad."""
    B = x0.shape[0]
    n = torch.randint(0, T, (B,), device=x0.device, generator=gen)
    eps = torch.empty_like(x0).normal_(generator=gen)  # keeps x0's memory format
    xt = tabs.a[n].view(B, 1, 1, 1) * x0 + tabs.s[n].view(B, 1, 1, 1) * eps
    with torch.autocast(x0.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        out = fwd(xt, n)
    loss = F.mse_loss(out.float(), eps)
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_format(model, x0, channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    return x0.contiguous(memory_format=fmt)


# -- FLOPs -------------------------------------------------------------------------------------
def _cpu_attention_flops():
    """FlopCounterMode misses CPU flash attention (its CUDA kernels are registered); add it."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v))
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v))
    return mapping


def count_flops(name, model, tabs, device, batch) -> int:
    """Model FLOPs of forward + backward at ``batch`` (counted at batch <= 2 and scaled: every op is
    linear in the batch size)."""
    from torch.utils.flop_counter import FlopCounterMode
    b = min(batch, 2)
    x0 = torch.randn(b, 3, 32, 32, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as fcm:
        train_step(forward_fn(name, model, tabs), None, x0, tabs, None, gen)
    model.zero_grad(set_to_none=True)
    return fcm.get_total_flops() * batch // b


# -- CPU peak memory in a subprocess -----------------------------------------------------------
def _proc_status(field: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_probe(spec: dict) -> None:
    """Child process: RSS growth while building one network and taking two training steps."""
    torch.set_num_threads(spec["threads"])
    device = torch.device("cpu")
    args = argparse.Namespace(**spec["dit"])
    if spec["model"] == "diffusers":
        import diffusers  # noqa: F401  (imported before the baseline)
    import diffkit_backbones  # noqa: F401
    tabs = Tables(device)
    x0 = torch.randn(spec["batch"], 3, 32, 32)
    torch.ones(4, 4) @ torch.ones(4, 4)
    base = _proc_status("VmRSS")
    model = build(spec["model"], args)
    x0 = to_format(model, x0, spec["channels_last"])
    opt, _ = make_optimizer(model, device)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        train_step(forward_fn(spec["model"], model, tabs), opt, x0, tabs, DTYPES[spec["dtype"]], gen)
    # VmHWM, not getrusage's ru_maxrss: Linux carries the forked parent's RSS into ru_maxrss across exec
    peak = max(_proc_status("VmHWM"), _proc_status("VmRSS"))
    print("PROBE " + json.dumps({"bytes": peak - base}), flush=True)


def cpu_peak_memory(name, dtype, args, channels_last) -> float | None:
    spec = dict(model=name, dtype=dtype, batch=args.batch, channels_last=channels_last,
                threads=torch.get_num_threads(),
                dit=dict(dit_hidden=args.dit_hidden, dit_depth=args.dit_depth, dit_heads=args.dit_heads))
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--_rss-probe", json.dumps(spec)],
                           capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        log(f"  memory probe {name}/{dtype}: timed out")
        return None
    for line in r.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])["bytes"]
    log(f"  memory probe {name}/{dtype} failed (rc {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    return None


def state_bytes(model, opt) -> int:
    n = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return n


# -- main --------------------------------------------------------------------------------------
class Variant:
    """One timed configuration: network x memory format x dtype x eager/compiled."""

    def __init__(self, name, cl, dtype, compiled, fwd):
        self.name, self.cl, self.dtype, self.compiled, self.fwd = name, cl, dtype, compiled, fwd
        self.times: list[float] = []
        self.mem: int | None = None

    key = property(lambda self: (self.name, self.cl))
    mode = property(lambda self: "compile" if self.compiled else "eager")
    format = property(lambda self: "channels_last" if self.cl else "contiguous")
    median = property(lambda self: statistics.median(self.times))

    @property
    def label(self):
        fmt = f"/{self.format}" if self.name in CONV_MODELS else ""
        return f"{self.name}{fmt}/{self.dtype}/{self.mode}"


def channels_last_trial(name, model, x_base, tabs, dtypes, device, gen, steps=3) -> bool:
    """Time a few eager steps in each memory format (throw-away optimiser); True if channels_last wins."""
    opt, _ = make_optimizer(model, device)
    per, tot = {}, {False: 0.0, True: 0.0}
    for cl in (False, True):
        x0 = to_format(model, x_base, cl)
        fwd = forward_fn(name, model, tabs)
        for dt in dtypes:
            opt.state.clear()
            train_step(fwd, opt, x0, tabs, DTYPES[dt], gen)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(fwd, opt, x0, tabs, DTYPES[dt], gen)
            sync(device)
            per[(cl, dt)] = (time.perf_counter() - t0) / steps
            tot[cl] += per[(cl, dt)]
    model.zero_grad(set_to_none=True)
    win = tot[True] < tot[False]
    detail = ", ".join(f"{dt} {per[(False, dt)] * 1e3:,.1f} vs {per[(True, dt)] * 1e3:,.1f} ms" for dt in dtypes)
    print(f"memory format {name} (trial, {steps} eager steps): contiguous vs channels_last {detail} -> "
          f"{'channels_last' if win else 'contiguous'}", flush=True)
    return win


def set_tf32(on: bool) -> None:
    """TF32 for fp32 matmuls and convolutions.  Through ``set_float32_matmul_precision`` and
    ``cudnn.allow_tf32``, which keep the legacy and the per-backend flags consistent (setting the
    new ``fp32_precision`` flags makes legacy reads, which inductor does, raise)."""
    torch.set_float32_matmul_precision("high" if on else "highest")
    torch.backends.cudnn.allow_tf32 = on


def parse_peaks(s: str | None, device, tf32: bool) -> dict:
    """Peak TFLOP/s per dtype name: from ``--peak-tflops`` ("989" or "bf16=989,fp32=494"), else defaults."""
    if s:
        if "=" not in s:
            return {"fp32": float(s), "bf16": float(s)}
        out = {}
        for part in s.split(","):
            k, v = part.split("=")
            out[k.strip()] = float(v)
        return out
    if device.type == "cuda":
        return {"bf16": GPU_PEAKS["bf16"], "fp32": GPU_PEAKS["tf32" if tf32 else "fp32"]}
    return {}


def fmt_bytes(b):
    return "n/a" if b is None else f"{b / 2**20:,.0f} MiB"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 128 on CUDA")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed run (default 1 on CPU, 20 on CUDA)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 5)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 1 on CPU, 5 on CUDA)")
    ap.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument("--models", default="unet,dit,diffusers", help="comma list of unet, dit, diffusers")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune)")
    ap.add_argument("--channels-last", choices=["auto", "both", "on", "off"], default="auto",
                    help="memory format of the conv nets (unet, diffusers). both: time contiguous and "
                         "channels_last as separate rows; on/off: force; auto (default): both on CPU, "
                         "on CUDA a short eager trial picks one per network")
    ap.add_argument("--peak-tflops", default=None,
                    help="peak for MFU: one number, or per dtype 'bf16=989,fp32=494' "
                         "(default on CUDA: H100/H200 dense 989 bf16, 494 tf32; none on CPU)")
    ap.add_argument("--no-tf32", dest="tf32", action="store_false", help="CUDA fp32 without TF32")
    ap.add_argument("--cpu-memory", choices=["rss", "off"], default="rss",
                    help="CPU peak memory by the peak RSS of a subprocess per network and dtype, or skip")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--dit-hidden", type=int, default=512)
    ap.add_argument("--dit-depth", type=int, default=7)
    ap.add_argument("--dit-heads", type=int, default=8)
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    ap.add_argument("--_rss-probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._rss_probe:
        return rss_probe(json.loads(args._rss_probe))

    t_start = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (128 if cuda else 8)
    args.steps = args.steps or (20 if cuda else 1)
    args.repeats = args.repeats or 5
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [m for m in models if m not in MODELS] + [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"unknown model/dtype {bad}; models: {MODELS}, dtypes: {tuple(DTYPES)}")
    if cuda:
        torch.backends.cudnn.benchmark = True
        set_tf32(args.tf32)
    peaks = parse_peaks(args.peak_tflops, device, args.tf32)

    header = []
    dev_name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    header.append(f"device: {device} ({dev_name}), torch {torch.__version__}, threads {torch.get_num_threads()}"
                  + ("" if cuda else f", load average at start {os.getloadavg()[0]:.2f}"))
    try:
        import diffusers
        header.append(f"diffusers {diffusers.__version__}")
    except ImportError:
        diffusers = None
        if "diffusers" in models:
            ap.error("diffusers is not installed; drop it from --models")
    header.append(f"batch {args.batch} x 3x32x32, {args.steps} step(s) per timed run, {args.repeats} interleaved "
                  f"repeats, {args.warmup} warm-up step(s); dtypes {', '.join(dtypes)} (bf16 = torch.autocast)")
    if cuda:
        header.append(f"fp32 matmul/conv TF32: {'on' if args.tf32 else 'off'}; cudnn.benchmark on")
    if peaks:
        src = "--peak-tflops" if args.peak_tflops else "assumed H100/H200 SXM dense peak"
        header.append("MFU peak: " + ", ".join(f"{k} {v:g} TFLOP/s" for k, v in peaks.items()) + f" ({src})")
        if cuda and not args.peak_tflops and not any(s in dev_name for s in ("H100", "H200")):
            header.append(f"WARNING: {dev_name} is not an H100/H200; pass --peak-tflops for a meaningful MFU")
    else:
        header.append("MFU: n/a (no peak on CPU; pass --peak-tflops to compute it)")
    for line in header:
        print(line, flush=True)

    # -- networks and parameter check --
    tabs = Tables(device)
    nets, counts = {}, {}
    for name in models:
        nets[name] = build(name, args).to(device)
        counts[name] = nparams(nets[name])
    ref = counts.get("diffusers")
    if ref is None and diffusers is not None:
        ref = nparams(build("diffusers", args))
    ref = ref or DDPM_CIFAR10_PARAMS
    print(f"parameters: diffusers UNet2DModel (google/ddpm-cifar10-32 config) {ref:,}")
    desc = {"unet": f"diffkit unet {UNET_OPTS}", "dit": f"diffkit dit {dit_opts(args)}"}
    ok = True
    for name in models:
        if name == "diffusers":
            continue
        rel = counts[name] / ref - 1
        inside = abs(rel) <= 0.10
        ok &= inside
        flag = "" if inside else "  OUTSIDE +-10%"
        print(f"parameters: {desc[name]} {counts[name]:,} ({rel:+.1%} vs diffusers){flag}")
    assert ok, "parameter counts must lie within +-10% of diffusers' UNet2DModel"

    # -- FLOPs (eager fp32; the count does not depend on dtype or memory format) --
    flops = {}
    for name in models:
        flops[name] = count_flops(name, nets[name], tabs, device, args.batch)
        print(f"model FLOPs per training step (fwd+bwd, batch {args.batch}): {name} {flops[name] / 1e9:,.1f} GFLOP")

    # -- memory format of the conv nets: both timed as variants, or one chosen by a short trial --
    gen = torch.Generator(device=device).manual_seed(1)
    x_base = torch.randn(args.batch, 3, 32, 32, device=device, generator=gen)
    mode_cl = args.channels_last
    if mode_cl == "auto":
        mode_cl = "trial" if cuda else "both"
    formats = {}
    for name in models:
        if name not in CONV_MODELS:
            formats[name] = [False]
        elif mode_cl in ("on", "off"):
            formats[name] = [mode_cl == "on"]
        elif mode_cl == "both":
            formats[name] = [False, True]
        else:
            formats[name] = [channels_last_trial(name, nets[name], x_base, tabs, dtypes, device, gen)]
    if any(len(f) > 1 for f in formats.values()):
        print("memory format: unet and diffusers timed both contiguous and channels_last; the faster per "
              "dtype and mode (marked *) is used for the ratios and targets", flush=True)
    xs, opts, runs = {}, {}, {}
    for name in models:
        base = nets.pop(name)
        for i, cl in enumerate(formats[name]):
            model = base if i == len(formats[name]) - 1 else copy.deepcopy(base)
            xs[(name, cl)] = to_format(model, x_base, cl)
            model.zero_grad(set_to_none=True)
            nets[(name, cl)] = model
            opts[(name, cl)], how = make_optimizer(model, device)
    print(f"optimiser: AdamW(lr=1e-4), {how} implementation", flush=True)

    # -- variants, warm-up (compile failures are reported and skipped) --
    variants = []
    for dt in dtypes:
        for compiled in ([False, True] if args.compile else [False]):
            for name in models:
                for cl in formats[name]:
                    variants.append(Variant(name, cl, dt, compiled, None))
    live = []
    for v in variants:
        try:
            t0 = time.perf_counter()
            model = nets[v.key]
            if v.compiled:
                model = torch.compile(model, mode=args.compile_mode)
            v.fwd = forward_fn(v.name, model, tabs)
            for _ in range(max(args.warmup, 2) if v.compiled else args.warmup):
                train_step(v.fwd, opts[v.key], xs[v.key], tabs, DTYPES[v.dtype], gen)
            sync(device)
            log(f"  warm-up {v.label} {time.perf_counter() - t0:.1f} s")
            live.append(v)
        except Exception as e:  # noqa: BLE001 - any compile failure is reported, not fatal
            if not v.compiled:
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"SKIPPED torch.compile for {v.label}: {type(e).__name__}: {msg[:300]}", flush=True)
            opts[v.key].zero_grad(set_to_none=True)

    # -- interleaved timing --
    for r in range(args.repeats):
        for v in live:
            opt, x0 = opts[v.key], xs[v.key]
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step(v.fwd, opt, x0, tabs, DTYPES[v.dtype], gen)
            sync(device)
            v.times.append((time.perf_counter() - t0) / args.steps)
            if cuda:
                mem = state_bytes(nets[v.key], opt) + torch.cuda.max_memory_allocated(device) - before
                v.mem = max(v.mem or 0, mem)
        log(f"  repeat {r + 1}/{args.repeats} done ({time.perf_counter() - t_start:.0f} s)")

    # -- best memory format per network, dtype and mode --
    best = {}
    for v in live:
        k = (v.name, v.dtype, v.mode)
        if k not in best or v.median < best[k].median:
            best[k] = v
    for (name, dt, mode), v in best.items():
        others = [w for w in live if (w.name, w.dtype, w.mode) == (name, dt, mode) and w is not v]
        if others:
            print(f"memory format {name}/{dt}/{mode}: {v.format} ({v.median * 1e3:,.0f} ms/step vs "
                  f"{others[0].median * 1e3:,.0f} ms/step {others[0].format})")

    # -- CPU memory probes (fresh subprocess per network and dtype, eager, best format) --
    mem_note = "CUDA: network state + rise of max_memory_allocated over the step"
    if not cuda:
        if args.cpu_memory == "rss":
            mem_note = ("CPU: peak-RSS growth of a fresh process building the net and taking 2 eager steps "
                        "(best format only; includes allocator/oneDNN caches)")
            for (name, dt, mode), v in best.items():
                if mode == "eager":
                    v.mem = cpu_peak_memory(name, dt, args, v.cl)
                    log(f"  memory probe {v.label}: {fmt_bytes(v.mem)} ({time.perf_counter() - t_start:.0f} s)")
        else:
            mem_note = "CPU: not measured (--cpu-memory off)"

    # -- table --
    unit, scale = ("TFLOP/s", 1e12) if cuda else ("GFLOP/s", 1e9)
    cols = ["model", "params", "dtype", "mode", "format", "samples/s", "ms/step", "min ms", "spread", "peak mem",
            "GFLOP/step", unit, "MFU", "thrpt x diffusers", "mem x diffusers"]
    rows, summary = [], {}
    for v in live:
        med = v.median
        thr = args.batch / med
        achieved = flops[v.name] / med
        peak = peaks.get(v.dtype)
        mfu = achieved / (peak * 1e12) if peak else None
        is_best = best[(v.name, v.dtype, v.mode)] is v
        if is_best:
            summary[(v.name, v.dtype, v.mode)] = dict(thr=thr, mfu=mfu, best=min(v.times))
        rv = best.get(("diffusers", v.dtype, v.mode))
        if rv is not None and v.name != "diffusers" and is_best:
            rthr = f"{thr / (args.batch / rv.median):.2f}"
            rmem = f"{v.mem / rv.mem:.2f}" if v.mem and rv.mem else "n/a"
        else:
            rthr, rmem = "-", "-"
        ftxt = "-" if v.name not in CONV_MODELS else v.format + ("*" if is_best and len(formats[v.name]) > 1 else "")
        rows.append([v.name, f"{counts[v.name] / 1e6:.1f}M", v.dtype, v.mode, ftxt,
                     f"{thr:,.2f}", f"{med * 1e3:,.0f}", f"{min(v.times) * 1e3:,.0f}",
                     f"{(max(v.times) - min(v.times)) / med:.0%}",
                     fmt_bytes(v.mem), f"{flops[v.name] / 1e9:,.1f}", f"{achieved / scale:,.2f}",
                     "n/a" if mfu is None else f"{mfu:.1%}", rthr, rmem])
    table = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    notes = [f"peak memory: {mem_note}",
             "samples/s, ms/step: median over the interleaved repeats; min ms: the fastest repeat; "
             "spread = (max - min) / median (large spreads mean a noisy machine: compare min ms too)",
             "ratios: diffkit / diffusers at the same dtype and mode, each in its faster memory format "
             "(memory: > 1 means diffkit uses more)"]
    targets = []
    for dt in dtypes:
        for mode in (["eager", "compile"] if args.compile else ["eager"]):
            u, d, t = (summary.get((m, dt, mode)) for m in ("unet", "diffusers", "dit"))
            if u and d:
                r = u["thr"] / d["thr"]
                targets.append(f"target unet >= 2x diffusers ({dt}, {mode}): {r:.2f}x "
                               f"{'MET' if r >= 2 else 'not met'} (by min step time: {d['best'] / u['best']:.2f}x)")
            if t:
                targets.append(f"target dit MFU >= 55% ({dt}, {mode}): "
                               + ("n/a (no peak)" if t["mfu"] is None else
                                  f"{t['mfu']:.1%} {'MET' if t['mfu'] >= 0.55 else 'not met'}"))
    wall = time.perf_counter() - t_start
    footer = [f"wall time {wall:.0f} s" + ("" if cuda else f", load average at end {os.getloadavg()[0]:.2f}")]
    print()
    print("\n".join(table))
    print()
    print("\n".join(notes + targets + footer))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# Backbone training-step benchmark\n\n")
            f.write("\n".join(f"- {h}" for h in header) + "\n")
            f.write("\n".join(f"- parameters {n}: {c:,}" for n, c in counts.items()) + "\n\n")
            f.write("\n".join(table) + "\n\n")
            f.write("\n".join(f"- {n}" for n in notes + targets + footer) + "\n")
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
