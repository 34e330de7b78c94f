"""GPU speed of diffkit against diffusers, side by side in one process (issue 17).

    python benchmarks/gpu.py --device cuda --markdown docs/bench/gpu.md --json docs/bench/gpu.json
    python benchmarks/gpu.py --smoke --markdown /tmp/gpu.md --json /tmp/gpu.json   # CPU, tiny, every code path

Sections (each network pair within +-10 % parameters; the check is a target line):

1. **UNet training step**: diffkit's ``unet`` with the DDPM CIFAR-10 preset of
   ``benchmarks/backbones.py`` (38.4 M) and its fast paths (``fused_norm_act=True``; memory
   format by trial, ``channels_last`` option) against diffusers' ``UNet2DModel`` in the
   ``google/ddpm-cifar10-32`` configuration (35.7 M; memory format by trial too), batch 128 of
   3x32x32, fp32 (TF32 on) / bf16 (autocast) / bf16 + ``torch.compile``.
2. **DiT training step**: diffkit's ``dit`` DiT-B/2-like (hidden 768, depth 12, 12 heads, patch
   2; 129.5 M) against diffusers' ``DiTTransformer2DModel`` of the same shape (138 M: it has a
   timestep/label embedding per block), 4x32x32 inputs (256 tokens), 10 classes, batch 256,
   bf16 eager and bf16 + compile.
3. **Sampling**: DDIM-50 and DPM-Solver++(2M)-20 at batch 512 around the *same* network (the
   diffkit UNet of section 1 under bf16 autocast, eager or compiled, one object shared by both
   loops): ``diffkit.sample`` through a ``Denoiser`` against diffusers' scheduler loop
   (``DDIMScheduler`` / ``DPMSolverMultistepScheduler``, linear betas, "trailing" spacing);
   network calls are counted and must be equal.
4. **Accuracy**: the diffkit UNet trained 200 steps from the same weights on the same data in
   fp32, bf16 and bf16 + compile with the same noise draws, and in fp32 with other draws (the
   curve's own noise); the loss curves are smoothed (moving average) and the largest relative
   difference to fp32 is compared with that noise.

The training step and its helpers are ``benchmarks/backbones.py``'s (same noise, eps-MSE,
fused AdamW, interleaved timing, FLOPs by ``FlopCounterMode`` at batch 2 scaled, CPU flash
attention counted).  MFU = counted model FLOPs x steps/s over the device's bf16 dense peak from
:data:`PEAKS` by device name (``--peak-tflops`` overrides; unknown device: n/a).  Peak memory on
CUDA: network state + rise of ``torch.cuda.max_memory_allocated`` over the timed run.
Targets printed PASS/FAIL: unet bf16+compile >= 2x diffusers' and >= 5150 img/s; DiT >= 55 %
MFU; sampling >= 2x diffusers' samples/s at equal NFE and network; bf16 (+compile) loss curves
within the fp32 noise.  The exit status is 0 unless something crashes.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # backbones.py's helpers, also when this file is loaded from a path (tests)
    sys.path.insert(0, _HERE)
import backbones as bb  # noqa: E402

import diffkit as dk  # noqa: E402
from diffkit._io import atomic_write  # noqa: E402
from diffkit.layout import Layout  # noqa: E402

#: bf16 dense matmul peak (TFLOP/s) by device-name substring, first match wins.  H200: issue 17's figure.
PEAKS = (("H200", 797.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
         ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0))
UNET_TARGET_IMG_S = 5150.0
SIZES = {
    "full": dict(batch=128, img=32, dit_batch=256, sample_batch=512, ddim_nfe=50, dpm_nfe=20, acc_steps=200,
                 acc_window=20, unet=bb.UNET_OPTS, diffusers=bb.DDPM_CIFAR10,
                 dit=dict(hidden=768, depth=12, num_heads=12, patch_size=2),
                 dit_diffusers=dict(num_attention_heads=12, attention_head_dim=64, num_layers=12)),
    "smoke": dict(batch=4, img=8, dit_batch=4, sample_batch=4, ddim_nfe=4, dpm_nfe=3, acc_steps=6, acc_window=2,
                  unet=dict(channels=15, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), num_heads=2, groups=8),
                  diffusers=dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                 layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")),
                  dit=dict(hidden=36, depth=2, num_heads=2, patch_size=2),
                  dit_diffusers=dict(num_attention_heads=2, attention_head_dim=16, num_layers=2)),
}
NUM_CLASSES = 10
log = bb.log


# -- networks ----------------------------------------------------------------------------------
def unet_layout(img: int) -> Layout:
    return Layout(channels=("r", "g", "b"), spatial=("y", "x"), shape=(img, img))


def dit_layout(img: int) -> Layout:
    return Layout(channels=("l0", "l1", "l2", "l3"), spatial=("y", "x"), shape=(img, img), num_classes=NUM_CLASSES)


def build(which: str, S: dict, *, channels_last: bool = False) -> nn.Module:
    """One network, seeded: ``dk_unet``, ``df_unet``, ``dk_dit`` or ``df_dit``."""
    torch.manual_seed(0)
    from diffkit_backbones import build_dit, build_unet
    if which == "dk_unet":
        return build_unet(unet_layout(S["img"]), **S["unet"], validate=False, fused_norm_act=True,
                          channels_last=channels_last)
    if which == "dk_dit":
        return build_dit(dit_layout(S["img"]), **S["dit"], validate=False)
    import diffusers
    if which == "df_unet":
        return diffusers.UNet2DModel(**S["diffusers"])
    return diffusers.DiTTransformer2DModel(in_channels=4, out_channels=4, patch_size=S["dit"]["patch_size"],
                                           sample_size=S["img"], num_embeds_ada_norm=NUM_CLASSES,
                                           **S["dit_diffusers"])


def forward_fn(which: str, model, tabs: bb.Tables):
    """``fwd(x_t, n) -> eps_hat`` of the common training step (labels ``n % 10`` for the DiTs)."""
    if which == "dk_unet":
        return lambda xt, n: model(xt, tabs.logsnr[n])
    if which == "df_unet":
        return lambda xt, n: model(xt, n).sample
    if which == "dk_dit":
        return lambda xt, n: model(xt, tabs.logsnr[n], labels=n % NUM_CLASSES)
    return lambda xt, n: model(xt, timestep=n, class_labels=n % NUM_CLASSES).sample


def step(fwd, opt, x0, tabs, amp_dtype, gen) -> torch.Tensor:
    """``bb.train_step``'s step (noise, forward under autocast, eps-MSE, backward, AdamW), returning the loss."""
    B = x0.shape[0]
    n = torch.randint(0, bb.T, (B,), device=x0.device, generator=gen)
    eps = torch.empty_like(x0).normal_(generator=gen)
    xt = tabs.a[n].view(B, 1, 1, 1) * x0 + tabs.s[n].view(B, 1, 1, 1) * eps
    with torch.autocast(x0.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        out = fwd(xt, n)
    loss = F.mse_loss(out.float(), eps)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def count_flops(fwd, x0, tabs, model) -> int:
    """Model FLOPs of one forward + backward at ``x0``'s batch, counted at batch 2 and scaled."""
    from torch.utils.flop_counter import FlopCounterMode
    b = min(x0.shape[0], 2)
    gen = torch.Generator(device=x0.device).manual_seed(0)
    with FlopCounterMode(display=False, custom_mapping=bb._cpu_attention_flops()) as fcm:
        bb.train_step(fwd, None, x0[:b].contiguous(), tabs, None, gen)
    model.zero_grad(set_to_none=True)
    return fcm.get_total_flops() * x0.shape[0] // b


def device_peak(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    for key, v in PEAKS:
        if key in name:
            return v, f"table ({key})"
    return None, "unknown device: pass --peak-tflops"


# -- timing ------------------------------------------------------------------------------------
class Run:
    """One timed training configuration."""

    def __init__(self, section, which, model, x0, dtype, compiled, fmt, args, tabs):
        self.section, self.which, self.dtype, self.compiled, self.format = section, which, dtype, compiled, fmt
        self.side = "diffkit" if which.startswith("dk") else "diffusers"
        self.model, self.x0 = model, x0
        self.opt, _ = bb.make_optimizer(model, x0.device)
        m = torch.compile(model, backend=args.compile_backend, mode=args.compile_mode) if compiled else model
        self.fwd = forward_fn(which, m, tabs)
        self.times: list[float] = []
        self.mem: int | None = None

    mode = property(lambda self: "compile" if self.compiled else "eager")
    label = property(lambda self: f"{self.section}/{self.side}/{self.dtype}/{self.mode}")


def time_runs(runs: list[Run], args, tabs, device, gen) -> None:
    """Warm up each run (compiling), then time them interleaved (A B C A B C ...)."""
    cuda = device.type == "cuda"
    for r in runs:
        t0 = time.perf_counter()
        for _ in range(max(args.warmup, 2) if r.compiled else args.warmup):
            step(r.fwd, r.opt, r.x0, tabs, bb.DTYPES[r.dtype], gen)
        bb.sync(device)
        log(f"  warm-up {r.label} {time.perf_counter() - t0:.1f} s")
    for i in range(args.repeats):
        for r in runs:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            bb.sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(r.fwd, r.opt, r.x0, tabs, bb.DTYPES[r.dtype], gen)
            bb.sync(device)
            r.times.append((time.perf_counter() - t0) / args.steps)
            if cuda:
                r.mem = max(r.mem or 0, bb.state_bytes(r.model, r.opt) + torch.cuda.max_memory_allocated(device) - before)
        log(f"  repeat {i + 1}/{args.repeats}")


def pick_format(which, S, args, tabs, device, gen) -> tuple[nn.Module, torch.Tensor, str]:
    """The network in its faster memory format (bf16 eager trial unless ``--channels-last on/off``),
    with its input batch.  diffkit: the ``channels_last`` option; diffusers: ``model.to(memory_format)``."""
    x = torch.randn(S["batch"], 3, S["img"], S["img"], device=device, generator=gen)

    def make(cl):
        if which == "dk_unet":
            m = build(which, S, channels_last=cl).to(device)
            return m, x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        m = build(which, S).to(device)
        return m, bb.to_format(m, x, cl)

    if args.channels_last != "auto":
        cl = args.channels_last == "on"
        return (*make(cl), "channels_last" if cl else "contiguous")
    cand, ms = {}, {}
    for cl in (False, True):
        m, xx = make(cl)
        opt, _ = bb.make_optimizer(m, device)
        fwd = forward_fn(which, m, tabs)
        step(fwd, opt, xx, tabs, torch.bfloat16, gen)
        bb.sync(device)
        t0 = time.perf_counter()
        for _ in range(args.trial_steps):
            step(fwd, opt, xx, tabs, torch.bfloat16, gen)
        bb.sync(device)
        ms[cl] = (time.perf_counter() - t0) / args.trial_steps * 1e3
        del opt
        cand[cl] = (m, xx)
    cl = ms[True] < ms[False]
    print(f"memory format {which} (bf16 eager trial, {args.trial_steps} steps): contiguous {ms[False]:,.1f} ms, "
          f"channels_last {ms[True]:,.1f} ms -> {'channels_last' if cl else 'contiguous'}", flush=True)
    m, xx = cand[cl]
    torch.manual_seed(0)  # the other candidate's weights are the same (seeded build); fresh weights for the runs
    m.load_state_dict(build(which, S).state_dict())
    return m, xx, "channels_last" if cl else "contiguous"


def training_rows(runs: list[Run], flops: dict, peak) -> list[dict]:
    rows = []
    for r in runs:
        med = statistics.median(r.times)
        fl = flops[r.which]
        rows.append(dict(section=r.section, side=r.side, network=r.which, dtype=r.dtype, mode=r.mode, format=r.format,
                         batch=r.x0.shape[0], samples_per_s=r.x0.shape[0] / med, ms_per_step=med * 1e3,
                         min_ms=min(r.times) * 1e3, spread=(max(r.times) - min(r.times)) / med, peak_mem_bytes=r.mem,
                         gflop_per_step=fl / 1e9, tflops=fl / med / 1e12,
                         mfu=None if peak is None else fl / med / (peak * 1e12)))
    return rows


# -- sampling ----------------------------------------------------------------------------------
class AmpNet(nn.Module):
    """The network under autocast (``dtype`` None: as is), returning float32; counts its calls."""

    def __init__(self, net, dtype, device_type):
        super().__init__()
        self.net, self.dtype, self.device_type = net, dtype, device_type
        self.layout = getattr(net, "layout", None)

    def forward(self, x, c_noise, scalars=None, labels=None):
        with torch.autocast(self.device_type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            return self.net(x, c_noise, scalars=scalars, labels=labels).float()


class Counted(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls, self.layout = net, 0, net.layout

    def forward(self, *a, **kw):
        self.calls += 1
        return self.net(*a, **kw)


def diffusers_loop(scheduler, net, tabs, x, nfe):
    """diffusers' usual sampling loop around the eps-network ``net(x, logsnr)``."""
    scheduler.set_timesteps(nfe, device=x.device)
    B = x.shape[0]
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = net(scheduler.scale_model_input(x, t), tabs.logsnr[t].expand(B).contiguous())
        x = scheduler.step(eps, t, x, return_dict=False)[0]
    return x


def sampling(net, S, args, tabs, device) -> list[dict]:
    """samples/s of both loops around the same network, per sampler and mode, timed interleaved."""
    import diffusers
    cfg = dict(num_train_timesteps=bb.T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
               prediction_type="epsilon", timestep_spacing="trailing")
    samplers = [("ddim", S["ddim_nfe"], diffusers.DDIMScheduler(**cfg, clip_sample=False)),
                ("dpmpp_2m", S["dpm_nfe"], diffusers.DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++",
                                                                                 solver_order=2))]
    schedule = dk.linear(bb.T, 1e-4, 0.02)
    dtype = bb.DTYPES[args.sample_dtype]
    B, shape = S["sample_batch"], (S["sample_batch"], 3, S["img"], S["img"])
    net.eval()
    rows = []
    for mode in ("eager", "compile"):
        inner = AmpNet(net, dtype, device.type)
        if mode == "compile":
            inner = torch.compile(inner, backend=args.compile_backend, mode=args.compile_mode)
        counted = Counted(inner)
        den = dk.Denoiser(counted, schedule, "eps")
        for name, nfe, sch in samplers:
            g = torch.Generator(device=device)

            def run_dk():
                return dk.sample(den, shape, sampler=name, nfe=nfe, spacing="uniform", generator=g.manual_seed(0),
                                 device=device)

            def run_df():
                x = torch.randn(shape, generator=g.manual_seed(0), device=device)
                with torch.no_grad():
                    return diffusers_loop(sch, counted, tabs, x, nfe)

            sides, t_warm = {"diffkit": run_dk, "diffusers": run_df}, time.perf_counter()
            calls, mem, times = {}, {}, {k: [] for k in sides}
            for side, f in sides.items():  # warm-up (compiles) and call count
                counted.calls = 0
                f()
                bb.sync(device)
                calls[side] = counted.calls
            log(f"  warm-up sampling {name}/{mode} {time.perf_counter() - t_warm:.1f} s")
            for _ in range(args.sample_repeats):
                for side, f in sides.items():
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                        before = torch.cuda.memory_allocated(device)
                    bb.sync(device)
                    t0 = time.perf_counter()
                    f()
                    bb.sync(device)
                    times[side].append(time.perf_counter() - t0)
                    if device.type == "cuda":
                        mem[side] = max(mem.get(side, 0), torch.cuda.max_memory_allocated(device) - before)
            for side in sides:
                med = statistics.median(times[side])
                rows.append(dict(sampler=name, nfe=nfe, nfe_counted=calls[side], mode=mode, side=side, batch=B,
                                 dtype=args.sample_dtype, s_per_batch=med, min_s=min(times[side]),
                                 samples_per_s=B / med, peak_mem_bytes=mem.get(side)))
    net.train()
    return rows


# -- accuracy ----------------------------------------------------------------------------------
def smooth(v: list[float], w: int) -> list[float]:
    """Trailing moving average over ``w`` steps (shorter at the start)."""
    out, acc = [], 0.0
    for i, x in enumerate(v):
        acc += x - (v[i - w] if i >= w else 0.0)
        out.append(acc / min(i + 1, w))
    return out


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def accuracy(S, args, tabs, device, cl: bool) -> dict:
    """Loss curves of the diffkit UNet from the same weights and data: fp32 (seed 0 and seed 1),
    bf16 and bf16 + compile (seed 0); the smoothed curves' largest relative difference to fp32."""
    g = torch.Generator(device=device).manual_seed(123)
    x0 = torch.randn(S["batch"], 3, S["img"], S["img"], device=device, generator=g)
    x0 = F.avg_pool2d(F.pad(x0, (1, 1, 1, 1), mode="circular"), 3, stride=1) * 2  # smooth, std ~ 0.7: learnable
    x0 = x0.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    init = build("dk_unet", S, channels_last=cl).state_dict()
    curves = {}
    for key, dtype, compiled, seed in (("fp32", "fp32", False, 0), ("fp32_seed1", "fp32", False, 1),
                                       ("bf16", "bf16", False, 0), ("bf16_compile", "bf16", True, 0)):
        model = build("dk_unet", S, channels_last=cl).to(device)
        model.load_state_dict(init)
        opt, _ = bb.make_optimizer(model, device)
        m = torch.compile(model, backend=args.compile_backend, mode=args.compile_mode) if compiled else model
        fwd = forward_fn("dk_unet", m, tabs)
        gen = torch.Generator(device=device).manual_seed(seed)
        t0 = time.perf_counter()
        losses = [step(fwd, opt, x0, tabs, bb.DTYPES[dtype], gen) for _ in range(S["acc_steps"])]
        curves[key] = torch.stack(losses).cpu().tolist()
        log(f"  accuracy run {key}: {S['acc_steps']} steps {time.perf_counter() - t0:.1f} s")
        del model, opt, m
    w = S["acc_window"]
    sm = {k: smooth(v, w) for k, v in curves.items()}
    diffs = {k: max_rel_diff(sm[k], sm["fp32"]) for k in ("bf16", "bf16_compile", "fp32_seed1")}
    return dict(steps=S["acc_steps"], window=w, curves=curves, max_rel_diff=diffs, noise=diffs["fp32_seed1"])


# -- report ------------------------------------------------------------------------------------
def _best(rows, **match):
    hit = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return max(hit, key=lambda r: r["samples_per_s"]) if hit else None


def targets(res: dict) -> list[dict]:
    out = []

    def add(name, value, threshold, ok, unit=""):
        out.append(dict(name=name, value=value, threshold=threshold, unit=unit,
                        status="n/a" if ok is None else ("PASS" if ok else "FAIL")))

    for sec, p in res["params"].items():
        add(f"{sec} parameters within +-10% of diffusers'", p["rel"], 0.10, abs(p["rel"]) <= 0.10, "relative")
    tr = res["training"]
    u, d = _best(tr, network="dk_unet", dtype="bf16", mode="compile"), _best(tr, network="df_unet", dtype="bf16",
                                                                              mode="compile")
    if u and d:
        r = u["samples_per_s"] / d["samples_per_s"]
        add("unet bf16+compile throughput >= 2x diffusers'", r, 2.0, r >= 2.0, "x")
        add("unet bf16+compile throughput >= 5150 img/s", u["samples_per_s"], UNET_TARGET_IMG_S,
            u["samples_per_s"] >= UNET_TARGET_IMG_S, "img/s")
    t = _best(tr, network="dk_dit", dtype="bf16", mode="compile")
    if t:
        add("dit bf16+compile MFU >= 55%", t["mfu"], 0.55, None if t["mfu"] is None else t["mfu"] >= 0.55, "MFU")
    for s in res["sampling"]:
        if s["side"] != "diffkit":
            continue
        o = next(x for x in res["sampling"] if x["side"] == "diffusers" and x["sampler"] == s["sampler"]
                 and x["mode"] == s["mode"])
        r = s["samples_per_s"] / o["samples_per_s"]
        same = s["nfe_counted"] == o["nfe_counted"]
        add(f"sampling {s['sampler']}-{s['nfe']} {s['mode']} >= 2x diffusers' samples/s (NFE {s['nfe_counted']} vs "
            f"{o['nfe_counted']})", r, 2.0, r >= 2.0 and same, "x")
    acc = res["accuracy"]
    for k in ("bf16", "bf16_compile") if acc else ():
        v = acc["max_rel_diff"][k]
        add(f"accuracy: {k} loss curve within the fp32 noise (max rel. diff of {acc['window']}-step means)", v,
            acc["noise"], v <= acc["noise"], "relative")
    return out


def _mem(b):
    return "n/a" if b is None else f"{b / 2**20:,.0f} MiB"


def markdown(res: dict) -> str:
    L = ["# GPU speed: diffkit against diffusers (issue 17)", "",
         f"Command: `python benchmarks/gpu.py {res['argv']}`  ", f"Wall time: {res['wall_s']:.0f} s", ""]
    L += [f"- {h}" for h in res["header"]] + [""]
    L += ["## Parameters", "", "| section | diffkit | diffusers | diffkit / diffusers - 1 |", "|---|---|---|---|"]
    L += [f"| {k} | {p['diffkit']:,} | {p['diffusers']:,} | {p['rel']:+.1%} |" for k, p in res["params"].items()]
    L += ["", "## Training step", "",
          "| section | side | dtype | mode | format | batch | samples/s | ms/step | min ms | spread | peak mem "
          "| GFLOP/step | TFLOP/s | MFU |", "|" + "---|" * 14]
    for r in res["training"]:
        L.append(f"| {r['section']} | {r['side']} | {r['dtype']} | {r['mode']} | {r['format']} | {r['batch']} | "
                 f"{r['samples_per_s']:,.1f} | {r['ms_per_step']:,.1f} | {r['min_ms']:,.1f} | {r['spread']:.0%} | "
                 f"{_mem(r['peak_mem_bytes'])} | {r['gflop_per_step']:,.1f} | {r['tflops']:,.3f} | "
                 f"{'n/a' if r['mfu'] is None else format(r['mfu'], '.1%')} |")
    L += ["", "## Sampling (same network on both sides)", "",
          "| sampler | NFE (counted) | mode | side | batch | s/batch | min s | samples/s | peak mem | diffkit / diffusers |",
          "|" + "---|" * 10]
    for s in res["sampling"]:
        o = next(x for x in res["sampling"] if x["sampler"] == s["sampler"] and x["mode"] == s["mode"]
                 and x["side"] == "diffusers")
        ratio = f"{s['samples_per_s'] / o['samples_per_s']:.2f}" if s["side"] == "diffkit" else "-"
        L.append(f"| {s['sampler']} | {s['nfe']} ({s['nfe_counted']}) | {s['mode']} | {s['side']} | {s['batch']} | "
                 f"{s['s_per_batch']:.3f} | {s['min_s']:.3f} | {s['samples_per_s']:,.1f} | {_mem(s['peak_mem_bytes'])} "
                 f"| {ratio} |")
    a = res["accuracy"] or dict(steps=0, window=0, max_rel_diff=dict(bf16=0.0, bf16_compile=0.0), noise=0.0,
                                curves={})
    L += ["", "## Accuracy (diffkit UNet, same weights, data and noise draws)", "",
          "not run" if not res["accuracy"] else
          f"{a['steps']} steps; loss curves smoothed by {a['window']}-step trailing means; largest relative difference "
          f"to the fp32 curve: bf16 {a['max_rel_diff']['bf16']:.2%}, bf16 + compile "
          f"{a['max_rel_diff']['bf16_compile']:.2%}; fp32 with other noise draws (the noise) {a['noise']:.2%}.  "
          "Final smoothed losses: " + ", ".join(f"{k} {smooth(v, a['window'])[-1]:.4f}" for k, v in a["curves"].items()),
          "", "## Targets", ""]
    L += [f"- **{t['status']}** {t['name']}: {_fmt_target(t)}" for t in res["targets"]]
    return "\n".join(L) + "\n"


def _fmt_target(t) -> str:
    v, th = t["value"], t["threshold"]
    if v is None:
        return "n/a (no peak for this device: pass --peak-tflops)"
    if t["unit"] in ("relative", "MFU"):
        return f"{v:.2%} (threshold {th:.2%})"
    return f"{v:,.2f} {t['unit']} (threshold {th:,g})"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny networks and sizes, a few steps, torch.compile with "
                    "the 'eager' backend (dynamo only): every code path in about a minute on a CPU")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed run (default 20; smoke 1)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved timed runs per variant (default 5; smoke 1)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5; smoke 1)")
    ap.add_argument("--trial-steps", type=int, default=None, help="steps per memory-format trial (default 5; smoke 1)")
    ap.add_argument("--sample-repeats", type=int, default=None, help="timed sampling runs per side (default 3; smoke 1)")
    ap.add_argument("--sample-dtype", choices=tuple(bb.DTYPES), default=None, help="default bf16 (smoke: fp32)")
    ap.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                    help="memory format of both UNets: auto = a bf16 eager trial per side picks the faster")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; smoke eager)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (default: by device name)")
    ap.add_argument("--no-tf32", dest="tf32", action="store_false", help="CUDA fp32 without TF32")
    ap.add_argument("--sections", default="unet,dit,sampling,accuracy", help="comma list of those four")
    ap.add_argument("--markdown", default=None, help="write the report here (atomically)")
    ap.add_argument("--json", default=None, help="write the results here (atomically)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    smoke = args.smoke
    S = SIZES["smoke" if smoke else "full"]
    for k, full, sm in (("steps", 20, 1), ("repeats", 5, 1), ("warmup", 5, 1), ("trial_steps", 5, 1),
                        ("sample_repeats", 3, 1), ("sample_dtype", "bf16", "fp32"),
                        ("compile_backend", "inductor", "eager")):
        if getattr(args, k) is None:
            setattr(args, k, sm if smoke else full)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in ("unet", "dit", "sampling", "accuracy")]
    if bad:
        ap.error(f"unknown --sections {bad}; choose from unet, dit, sampling, accuracy")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        bb.set_tf32(args.tf32)
    import diffusers
    from diffusers.utils import logging as dlogging
    dlogging.set_verbosity_error()
    dev_name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    peak, peak_src = device_peak(dev_name, args.peak_tflops)
    header = [f"device: {device} ({dev_name}), torch {torch.__version__}, diffusers {diffusers.__version__}, "
              f"threads {torch.get_num_threads()}" + (", SMOKE: tiny sizes, numbers meaningless" if smoke else ""),
              f"MFU peak (bf16 dense): {'n/a' if peak is None else f'{peak:g} TFLOP/s'} ({peak_src}); all rows "
              "against the bf16 peak",
              f"timing: {args.steps} step(s) per run, {args.repeats} interleaved repeats, {args.warmup} warm-up "
              f"step(s); torch.compile backend {args.compile_backend}, mode {args.compile_mode}; fp32 TF32 "
              f"{'on' if args.tf32 and cuda else 'off'}; bf16 = torch.autocast; optimiser AdamW (fused where available)",
              f"diffkit unet options {dict(S['unet'])} + fused_norm_act=True (channels_last by trial); diffusers "
              f"UNet2DModel {'google/ddpm-cifar10-32 config' if not smoke else 'tiny config'}",
              f"diffkit dit {S['dit']}; diffusers DiTTransformer2DModel {S['dit_diffusers']}, {NUM_CLASSES} classes"]
    for h in header:
        print(h, flush=True)
    tabs = bb.Tables(device)
    gen = torch.Generator(device=device).manual_seed(1)
    res = dict(argv=" ".join(sys.argv[1:] if argv is None else argv), smoke=smoke, device=dev_name, header=header,
               peak_tflops=peak, params={}, training=[], sampling=[], accuracy=None, sizes=S)
    dk_unet, unet_cl = None, False
    if "unet" in sections or "sampling" in sections or "accuracy" in sections:
        dk_unet, x_dk, fmt_dk = pick_format("dk_unet", S, args, tabs, device, gen)
        unet_cl = fmt_dk == "channels_last"
    if "unet" in sections:
        df_unet, x_df, fmt_df = pick_format("df_unet", S, args, tabs, device, gen)
        res["params"]["unet"] = _params(dk_unet, df_unet)
        flops = {"dk_unet": count_flops(forward_fn("dk_unet", dk_unet, tabs), x_dk, tabs, dk_unet),
                 "df_unet": count_flops(forward_fn("df_unet", df_unet, tabs), x_df, tabs, df_unet)}
        runs = []
        for dt, comp in (("fp32", False), ("bf16", False), ("bf16", True)):
            for which, m, x, fmt in (("dk_unet", dk_unet, x_dk, fmt_dk), ("df_unet", df_unet, x_df, fmt_df)):
                runs.append(Run("unet", which, copy.deepcopy(m), x, dt, comp, fmt, args, tabs))
        time_runs(runs, args, tabs, device, gen)
        res["training"] += training_rows(runs, flops, peak)
        del runs, df_unet
    if "dit" in sections:
        nets = {w: build(w, S).to(device) for w in ("dk_dit", "df_dit")}
        res["params"]["dit"] = _params(nets["dk_dit"], nets["df_dit"])
        x = torch.randn(S["dit_batch"], 4, S["img"], S["img"], device=device, generator=gen)
        flops = {w: count_flops(forward_fn(w, m, tabs), x, tabs, m) for w, m in nets.items()}
        runs = [Run("dit", w, copy.deepcopy(m) if comp else m, x, "bf16", comp, "-", args, tabs)
                for comp in (False, True) for w, m in nets.items()]
        time_runs(runs, args, tabs, device, gen)
        res["training"] += training_rows(runs, flops, peak)
        del runs, nets
    if "sampling" in sections:
        res["sampling"] = sampling(dk_unet, S, args, tabs, device)
    if "accuracy" in sections:
        res["accuracy"] = accuracy(S, args, tabs, device, unet_cl)
    res["wall_s"] = time.perf_counter() - t_start
    res["targets"] = targets(res)
    for r in res["training"]:
        print(f"{r['section']:5s} {r['side']:9s} {r['dtype']} {r['mode']:7s} {r['samples_per_s']:12,.1f} samples/s "
              f"{_mem(r['peak_mem_bytes']):>10s}  MFU {'n/a' if r['mfu'] is None else format(r['mfu'], '.1%')}")
    for s in res["sampling"]:
        print(f"sample {s['sampler']}-{s['nfe']} {s['mode']:7s} {s['side']:9s} {s['samples_per_s']:12,.1f} samples/s "
              f"(NFE counted {s['nfe_counted']})")
    for t in res["targets"]:
        print(f"target {t['status']}: {t['name']}: {_fmt_target(t)}")
    print(f"wall time {res['wall_s']:.0f} s", flush=True)
    if args.markdown:
        atomic_write(args.markdown, lambda f: f.write(markdown(res)))
        print(f"wrote {args.markdown}")
    if args.json:
        atomic_write(args.json, lambda f: json.dump(res, f, indent=1, default=str))
        print(f"wrote {args.json}")
    return res


def _params(dk_net, df_net) -> dict:
    a, b = bb.nparams(dk_net), bb.nparams(df_net)
    return dict(diffkit=a, diffusers=b, rel=a / b - 1)


if __name__ == "__main__":
    main()
