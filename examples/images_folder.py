"""Train a DDPM on a folder of your own images and sample it as a PNG grid.

    python examples/images_folder.py --folder path/to/images      # your images
    python examples/images_folder.py                              # a demo folder, written first
    python examples/images_folder.py --quick                      # reduced setting used in CI (~20 s)

The folder is read by the ``images`` adapter: image files (PNG, JPEG, ...) directly in it give
an unconditional model; class sub-folders (``folder/cats/*.png``, ``folder/dogs/*.png``) give a
class-conditional one, sampled with classifier-free guidance (Ho & Salimans 2022) -- one row per
class in the grid.  Images of different sizes are an error unless ``--size H W`` is given
(``--resize resize`` resamples, ``--resize crop`` centre-crops); ``--mode L`` / ``RGB`` converts
the channels.

Without ``--folder`` the script first writes a demo folder, ``OUT/demo_images/``, of 16x16 PNG
patches cut from two of scikit-image's bundled photographs (``gravel/`` and ``moon/``, two
classes of different texture), so it runs as written.  Outputs: ``OUT/samples.png`` and ``OUT/samples.npz`` (see
docs/images.md), ``OUT/report.json`` and the run directory ``OUT/run``.  For a conditional
model the report gives the fraction of samples that a logistic-regression classifier of simple
texture statistics (per channel: mean, standard deviation, mean absolute horizontal and vertical
differences), fitted on the training images, assigns to the class they were drawn for (chance:
one over the number of classes), beside its accuracy on the held-out real images.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from diffkit import Cond, sample
from diffkit.config import config_from_dict
from diffkit.model import load_for_sampling
from diffkit.train import Trainer


def write_demo_folder(root: Path, per_class: int = 150, patch: int = 16, seed: int = 0) -> Path:
    """``root/gravel/*.png`` and ``root/moon/*.png``: random ``patch``-pixel patches of two
    scikit-image sample photographs (bundled with scikit-image; nothing is downloaded)."""
    from PIL import Image

    from diffkit_images.adapter import patches, skimage_image

    rng = np.random.default_rng(seed)
    for name in ("gravel", "moon"):
        p = patches(skimage_image(name), (patch, patch), (patch // 2, patch // 2))
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i, k in enumerate(np.sort(rng.choice(len(p), size=min(per_class, len(p)), replace=False))):
            Image.fromarray(p[k, ..., 0]).save(d / f"{name}_{i:04d}.png")
    return root


def unet_levels(shape) -> list[int]:
    """Channel multipliers: one level per halving while the smaller side stays >= 4 (at most 4 levels)."""
    n, mult = min(shape), [1]
    while n // 2 >= 4 and len(mult) < 4:
        n //= 2
        mult.append(2)
    return mult


def texture_features(x: np.ndarray) -> np.ndarray:
    """Per channel of ``(N, C, H, W)`` images: mean, std, mean |horizontal| and |vertical| differences."""
    return np.concatenate([x.mean((2, 3)), x.std((2, 3)), np.abs(np.diff(x, axis=3)).mean((2, 3)),
                           np.abs(np.diff(x, axis=2)).mean((2, 3))], axis=1)


def texture_classifier(adapter):
    """Logistic regression on :func:`texture_features` of the training images; its held-out accuracy."""
    from sklearn.linear_model import LogisticRegression

    def xy(idx):
        x = adapter.data[torch.as_tensor(idx)].float().numpy()
        return texture_features(x), adapter.labels[idx].numpy()

    clf = LogisticRegression(max_iter=5000).fit(*xy(adapter.train_idx))
    xv, yv = xy(adapter.val_idx)
    return clf, (float((clf.predict(xv) == yv).mean()) if len(yv) else float("nan"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=None, help="folder of images (default: write a demo folder first)")
    ap.add_argument("--out", default="runs/images_folder", help="output folder")
    ap.add_argument("--quick", action="store_true", help="smaller model and budget (CI)")
    ap.add_argument("--steps", type=int, default=None, help="training steps")
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="image size to train at")
    ap.add_argument("--resize", choices=["error", "resize", "crop"], default=None,
                    help="images of another size: error (default without --size), resize (default with it) or crop")
    ap.add_argument("--mode", choices=["keep", "L", "RGB"], default="keep", help="channel conversion")
    ap.add_argument("--hflip", action="store_true", help="random horizontal flips of training images")
    ap.add_argument("--guidance", type=float, default=2.0, help="guidance scale (class-conditional models)")
    ap.add_argument("--n", type=int, default=None, help="samples (class-conditional: per class)")
    ap.add_argument("--nfe", type=int, default=20, help="denoiser evaluations per sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    out = Path(args.out)
    progress = not args.no_progress
    steps, ch, n = (150, 16, 8) if args.quick else (3000, 32, 16)
    steps, n = args.steps or steps, args.n or n
    folder = Path(args.folder) if args.folder else write_demo_folder(out / "demo_images",
                                                                     per_class=150 if args.quick else 600)
    options = {"source": str(folder), "mode": args.mode, "hflip": args.hflip, "seed": args.seed}
    if args.size:
        options.update(size=list(args.size), resize=args.resize or "resize")
    elif args.resize not in (None, "error"):
        ap.error(f"--resize {args.resize} needs --size H W")

    # 1. train; the adapter reads the folder once, here, to size the network
    from diffkit_images import ImageAdapter

    shape = ImageAdapter(**options, val_fraction=0).layout.shape
    cfg = config_from_dict({
        "run_dir": str(out / "run"),
        "data": {"adapter": "images", "options": options, "batch_size": 32, "val_fraction": 0.1},
        "model": {"backbone": "unet",
                  "options": {"channels": ch, "channel_mult": unet_levels(shape), "num_res_blocks": 1,
                              "attn_levels": [], "mid_attn": False}},
        "loss": {"p_uncond": 0.1},
        "trainer": {"steps": steps, "lr": 2e-3, "warmup": min(100, max(1, steps // 10)), "val_every": 0,
                    "ckpt_every": 0, "ema_decay": 0.995, "seed": args.seed, "log_every": max(1, steps // 10)},
        "sample": {"sampler": "dpmpp_2m", "nfe": args.nfe},
    })
    trainer = Trainer(cfg, device=args.device, progress=progress)
    trainer.fit()
    adapter = trainer.adapter

    # 2. sample from the checkpoint: a balanced set with guidance, or n unconditional samples
    den, _, adapter_cls = load_for_sampling(cfg.run_dir, device=args.device)
    layout = den.layout
    device = next(den.net.parameters()).device
    K = layout.num_classes
    labels = torch.arange(K * n, device=device) % K if K else None
    total = K * n if K else n
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = sample(den.bind(Cond(labels=labels) if K else None, args.guidance if K else None),
               (total, *layout.sample_shape), sampler="dpmpp_2m", nfe=args.nfe, generator=g, device=device,
               progress=progress)
    png = adapter_cls.decode(x, layout, out / "samples.png", labels=labels,
                             attrs={"guidance": args.guidance if K else "none", "nfe": args.nfe, "seed": args.seed})

    # 3. a report: data and sample statistics; class agreement for a conditional model
    z = np.load(png.with_suffix(".npz"), allow_pickle=False)
    data = adapter.data.float().numpy()
    report = {"folder": str(folder), "images": int(data.shape[0]), "shape": list(layout.shape),
              "channels": list(layout.channels), "class_names": layout.attrs.get("class_names"), "steps": steps,
              "data_mean": float(data.mean()), "data_std": float(data.std()),
              "sample_mean": float(z["x"].mean()), "sample_std": float(z["x"].std()),
              "outputs": [png.name, png.with_suffix(".npz").name]}
    if K:
        clf, real_acc = texture_classifier(adapter)
        lo, hi = np.asarray(layout.attrs["display_min"]), np.asarray(layout.attrs["display_max"])
        clamped = np.clip(z["x"], lo[:, None, None], hi[:, None, None])  # what an image file could hold
        report["classifier_accuracy_on_real_images"] = real_acc
        report["agreement"] = float((clf.predict(texture_features(clamped)) == z["labels"]).mean())
        report["guidance"] = args.guidance
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"{report['images']} images of {layout.shape[0]}x{layout.shape[1]} ({', '.join(layout.channels)}) from "
          f"{folder}; classes: {', '.join(report['class_names']) if K else 'none (unconditional)'}")
    print(f"mean / std: data {report['data_mean']:.1f} / {report['data_std']:.1f}, "
          f"samples {report['sample_mean']:.1f} / {report['sample_std']:.1f}")
    if K:
        print(f"classifier: {report['classifier_accuracy_on_real_images']:.3f} on held-out real images; "
              f"{report['agreement']:.3f} of the samples (guidance {args.guidance:g}) in the class drawn for")
    print(f"outputs in {out}/: samples.png, samples.npz, report.json, run/")
    return report


if __name__ == "__main__":
    main()
