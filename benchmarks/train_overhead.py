"""Training-step overhead of diffkit's engine against a hand-written PyTorch loop.

Both loops train the *same* backbone (same weights, data, optimiser and random draws) with
the simple eps-loss.  The hand-written loop is what a user would write from Ho et al. 2020:
draw n ~ U{1..T}, x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, MSE(net(x_t), eps).  The diffkit loop
calls :func:`diffkit.diffusion_loss` through a :class:`diffkit.Denoiser` (layout and
conditioning checks, float64 schedule arithmetic, finite-input check included).

Runs interleave (A B A B ...) so machine noise hits both alike; the median ratio is printed.
Target (issue 2): ratio <= 1.03.

    python benchmarks/train_overhead.py                # UNet on 3x32x32, CPU
    python benchmarks/train_overhead.py --backbone mlp --shape 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import diffkit as dk
from diffkit import registry


def build(args, device):
    shape = tuple(int(s) for s in args.shape.split("x"))
    C, spatial = shape[0], shape[1:]
    names = ("x", "y", "z")[: len(spatial)]
    layout = dk.Layout(channels=[f"c{i}" for i in range(C)], spatial=names, shape=spatial)
    opts = {"unet": dict(channels=args.width, channel_mult=(1, 2), num_res_blocks=1, attn_levels=()),
            "dit": dict(hidden=args.width, depth=2, num_heads=4, patch_size=4),
            "mlp": dict(hidden=args.width, depth=3)}[args.backbone]
    torch.manual_seed(0)
    net = registry.get("backbone", args.backbone)(layout, **opts).to(device)
    return layout, net


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="unet", choices=["unet", "dit", "mlp"])
    ap.add_argument("--shape", default="3x32x32", help="sample shape CxHxW..., e.g. 2 for vector data")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device(args.device)
    layout, net = build(args, device)
    schedule = dk.linear(1000)
    den = dk.Denoiser(net, schedule, "eps", layout)
    init_state = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    data = torch.randn(args.batch * 4, *layout.sample_shape, generator=g).to(device)
    ab_table = schedule.alpha_bar(schedule.discrete_times()).to(device=device, dtype=torch.float32)
    logsnr_table = (ab_table.log() - torch.log1p(-ab_table))

    def fresh_opt():
        net.load_state_dict(init_state)
        return torch.optim.AdamW(net.parameters(), lr=1e-4)

    def run_bare(steps):
        opt = fresh_opt()
        gen = torch.Generator(device=device).manual_seed(2)
        for i in range(steps):
            x0 = data[(i % 4) * args.batch:(i % 4 + 1) * args.batch]
            n = torch.randint(0, 1000, (x0.shape[0],), generator=gen, device=device)
            eps = torch.randn(x0.shape, generator=gen, device=device)
            ab = ab_table[n].view(-1, *([1] * (x0.ndim - 1)))
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
            loss = ((net(xt, logsnr_table[n]) - eps) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss

    def run_diffkit(steps):
        opt = fresh_opt()
        gen = torch.Generator(device=device).manual_seed(2)
        for i in range(steps):
            x0 = data[(i % 4) * args.batch:(i % 4 + 1) * args.batch]
            loss = dk.diffusion_loss(den, x0, generator=gen).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(args.steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.steps

    run_bare(2), run_diffkit(2)  # warm-up
    bare, dkit = [], []
    for _ in range(args.repeats):
        bare.append(timed(run_bare))
        dkit.append(timed(run_diffkit))
    ratios = [d / b for d, b in zip(dkit, bare)]
    nparam = sum(p.numel() for p in net.parameters())
    print(f"backbone={args.backbone} params={nparam/1e6:.2f}M shape={layout.sample_shape} batch={args.batch} "
          f"device={device} threads={torch.get_num_threads()}")
    print(f"bare PyTorch loop : {statistics.median(bare)*1e3:8.2f} ms/step (median of {args.repeats})")
    print(f"diffkit engine    : {statistics.median(dkit)*1e3:8.2f} ms/step")
    r = statistics.median(ratios)
    print(f"ratio diffkit/bare: {r:.3f}  (per-run: {', '.join(f'{x:.3f}' for x in ratios)})  "
          f"target <= 1.03: {'PASS' if r <= 1.03 else 'FAIL'}")


if __name__ == "__main__":
    main()
