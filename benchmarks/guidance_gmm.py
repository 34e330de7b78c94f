"""Guided sampling against exact posteriors: MMPS, reconstruction guidance and DPS on a Gaussian mixture.

    python benchmarks/guidance_gmm.py [--n 2000] [--nfe 10 20 50] [--seeds 0] [--sweep] [--smc [NFE ...]] [--markdown FILE]

The prior is a Gaussian mixture with isotropic components (K = 4, samples of shape (1, 2, 2), so
d = 4), whose exact denoiser E[x0 | x_t] is :class:`diffkit.GaussianMixtureDenoiser`.  With a
linear operator ``A`` and noise ``N(0, sigma_y^2 I)`` the posterior is again a mixture in closed
form: component k is ``N(mu_k + K_k (y - A mu_k), s_k^2 I - K_k A s_k^2)`` with
``K_k = s_k^2 A^T S_k^{-1}``, ``S_k = s_k^2 A A^T + sigma_y^2 I``, and weight proportional to
``w_k N(y; A mu_k, S_k)`` (:func:`gmm_posterior`).  Two operators: a mask observing 2 of the 4
values and a dense random 2 x 4 matrix; ``y`` is a noisy observation of a draw of the prior.

Each guidance method (its default options, ``cg_iters`` 10 for MMPS) samples ``n`` points with the
default sampler (DPM-Solver++(2M), logsnr grid) at each NFE; the metric is the sliced
2-Wasserstein distance (:func:`diffkit.metrics.sliced_wasserstein`, 256 fixed projections) to
``n`` exact posterior samples.  The *floor* is the same distance between two independent sets of
``n`` exact samples (mean of 3 pairs): what sampling noise alone gives.  ``--seeds`` repeats the
whole measurement on other draws of the mixture, the operator and ``y``; ``--sweep`` adds the
ratios of DPS over ``zeta`` and of reconstruction guidance over ``gamma`` (NFE 20, first seed).  Each row also gives the
distance of the unguided prior samples (how far "no guidance" is) and the cost per denoiser
call in vector-Jacobian products.

``--smc [NFE ...]`` adds twisted SMC (:func:`diffkit.smc.twisted_smc`) over each method at those NFEs
(default 20 100 400): its sliced W2, that of exact samples with the same duplicates, the modes'
weights against the closed form and the final effective sample size.

The helpers (exact full-covariance Gaussian denoiser, closed-form posteriors, operator matrices)
are also used by ``tests/test_guidance.py``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import diffkit as dk
from diffkit._shape import as_batch_time
from diffkit.guidance import LinearOperator, MaskOperator, Observation
from diffkit.registry import get_guidance
from diffkit.metrics import sliced_wasserstein

DT = torch.float64


# -- exact references -----------------------------------------------------------------------------
class FullGaussianDenoiser:
    """Exact ``E[x0 | x_t]`` for ``x0 ~ N(mean, cov)`` (full covariance over the flattened sample):
    ``mean + U diag(alpha l / (alpha^2 l + sigma^2)) U^T (x_t - alpha mean)`` with ``cov = U diag(l) U^T``.
    Differentiable in ``x_t`` (its Jacobian is symmetric), so guidance can differentiate through it."""

    def __init__(self, schedule, mean, cov, sample_shape):
        self.schedule = schedule
        self.sample_shape = tuple(sample_shape)
        self.mean = torch.as_tensor(mean, dtype=DT).flatten()
        self.cov = torch.as_tensor(cov, dtype=DT)
        self.lam, self.U = torch.linalg.eigh(self.cov)
        self.nfe = 0

    def __call__(self, x, t):
        self.nfe += 1
        a, s = self.schedule.coeffs(as_batch_time(t, x.shape[0], device=x.device))
        xf = x.flatten(1).to(DT)
        gain = a[:, None] * self.lam[None] / (a[:, None] ** 2 * self.lam[None] + s[:, None] ** 2)
        z = (xf - a[:, None] * self.mean[None]) @ self.U
        x0 = self.mean[None] + (gain * z) @ self.U.T
        return x0.reshape(x.shape).to(x.dtype)

    def sample_data(self, n, generator=None):
        L = torch.linalg.cholesky(self.cov)
        z = torch.randn((n, self.mean.numel()), generator=generator, dtype=DT)
        return (self.mean + z @ L.T).reshape(n, *self.sample_shape)


def operator_matrix(op, sample_shape) -> torch.Tensor:
    """The dense matrix ``(n_obs, d)`` of a linear operator, column by column."""
    d = math.prod(sample_shape)
    eye = torch.eye(d, dtype=DT).reshape(d, *sample_shape)
    return op(eye).reshape(d, -1).T.contiguous()


def gaussian_posterior(mean, cov, A, sigma_y, y):
    """``(mean, cov)`` of ``x0 | y`` for ``x0 ~ N(mean, cov)``, ``y = A x0 + N(0, diag(sigma_y^2))``."""
    sy2 = torch.broadcast_to(torch.as_tensor(sigma_y, dtype=DT) ** 2, (A.shape[0],))
    S = A @ cov @ A.T + torch.diag(sy2)
    K = cov @ A.T @ torch.linalg.inv(S)
    pm = mean + K @ (y - A @ mean)
    pc = cov - K @ A @ cov
    return pm, 0.5 * (pc + pc.T)


def gaussian_conditional_mean(mean, cov, A, sigma_y, y, x_t, alpha, sigma):
    """Exact ``E[x0 | x_t, y]`` for the Gaussian prior (one sample ``x_t`` flattened, floats ``alpha``,
    ``sigma``): the precision-weighted combination of the prior, ``x_t`` and ``y``."""
    d = mean.numel()
    sy2 = torch.broadcast_to(torch.as_tensor(sigma_y, dtype=DT) ** 2, (A.shape[0],))
    Ci = torch.linalg.inv(cov)
    P = Ci + (alpha**2 / sigma**2) * torch.eye(d, dtype=DT) + A.T @ (A / sy2[:, None])
    rhs = Ci @ mean + (alpha / sigma**2) * x_t + A.T @ (y / sy2)
    return torch.linalg.solve(P, rhs)


def narrow_masked_problem(generator, *, std: float = 0.01, sigma_y: float = 0.01, shape=(1, 16)):
    """A Gaussian prior of std ``std`` in model units (``diffkit.GaussianDenoiser``, mean 0.3 + std N(0, 1)),
    every other value observed with noise ``sigma_y``: ``(denoiser, obs, mask, prior mean, posterior mean
    of the observed values, their posterior std)`` in closed form (tests at the scales that matter)."""
    mean = 0.3 + std * torch.randn(shape, generator=generator, dtype=DT)
    den = dk.GaussianDenoiser(dk.cosine(), mean, std)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.view(-1)[::2] = True
    truth = mean + std * torch.randn(shape, generator=generator, dtype=DT)
    n = int(mask.sum())
    y = truth[mask][None] + sigma_y * torch.randn((1, n), generator=generator, dtype=DT)
    post_sd = 1.0 / math.sqrt(1 / std**2 + 1 / sigma_y**2)
    post_mean = (mean[mask] / std**2 + y[0] / sigma_y**2) * post_sd**2
    return den, Observation(MaskOperator(mask), y, sigma_y), mask, mean, post_mean, post_sd


def gmm_posterior(means, stds, weights, A, sigma_y, y):
    """The posterior mixture of an isotropic Gaussian-mixture prior under ``y = A x0 + N(0, sigma_y^2 I)``:
    ``(log_weights (K,), means (K, d), covs (K, d, d))``."""
    n = A.shape[0]
    logw, pms, pcs = [], [], []
    for mu, s, w in zip(means, stds, weights):
        C = float(s) ** 2 * torch.eye(mu.numel(), dtype=DT)
        S = A @ C @ A.T + float(sigma_y) ** 2 * torch.eye(n, dtype=DT)
        pm, pc = gaussian_posterior(mu, C, A, sigma_y, y)
        r = y - A @ mu
        logw.append(math.log(float(w)) - 0.5 * float(r @ torch.linalg.solve(S, r)) - 0.5 * float(torch.logdet(S)))
        pms.append(pm)
        pcs.append(pc)
    logw = torch.tensor(logw, dtype=DT)
    return logw - torch.logsumexp(logw, 0), torch.stack(pms), torch.stack(pcs)


def sample_mixture(logw, means, covs, n, generator=None):
    """``n`` exact samples ``(n, d)`` of a full-covariance Gaussian mixture."""
    k = torch.multinomial(logw.exp(), n, replacement=True, generator=generator)
    L = torch.linalg.cholesky(covs + 1e-12 * torch.eye(covs.shape[-1], dtype=DT))
    z = torch.randn((n, means.shape[1]), generator=generator, dtype=DT)
    return means[k] + (L[k] @ z[..., None])[..., 0]


# -- the problem ----------------------------------------------------------------------------------
SHAPE = (1, 2, 2)


def gmm_problem(operator: str, *, seed: int = 0, sigma_y: float = 0.1):
    """``(denoiser, obs, exact_sampler)`` for the benchmark's mixture and ``operator`` ("mask" or "dense")."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(SHAPE)
    K = 4
    means = 1.5 * torch.randn((K, d), generator=g, dtype=DT)
    stds = torch.tensor([0.3, 0.5, 0.4, 0.6], dtype=DT)
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=DT)
    den = dk.GaussianMixtureDenoiser(dk.cosine(), means.reshape(K, *SHAPE), stds, weights)
    if operator == "mask":
        mask = torch.zeros(SHAPE, dtype=torch.bool)
        mask[0, 0, 0] = mask[0, 1, 1] = True
        op = MaskOperator(mask)
    elif operator == "dense":
        op = LinearOperator(torch.randn((2, d), generator=g, dtype=DT) / math.sqrt(d), SHAPE)
    else:
        raise ValueError(f"unknown operator {operator!r}; choose mask or dense")
    A = operator_matrix(op, SHAPE)
    x_true = den.sample_data(1, generator=g).reshape(1, d)
    y = x_true @ A.T + sigma_y * torch.randn((1, A.shape[0]), generator=g, dtype=DT)
    obs = Observation(op, y, sigma_y)
    logw, pm, pc = gmm_posterior(means, stds, weights, A, sigma_y, y[0])

    def exact(n, generator):
        return sample_mixture(logw, pm, pc, n, generator).reshape(n, *SHAPE)

    exact.posterior = (logw, pm, pc)  # the closed-form mixture, for mode weights
    return den, obs, exact


def mode_fractions(x, posterior) -> torch.Tensor:
    """The fraction of samples ``x`` whose most probable posterior component is each component: ``(K,)``."""
    logw, pm, pc = posterior
    xf = x.flatten(1).to(DT)
    lp = torch.stack([logw[k] + torch.distributions.MultivariateNormal(pm[k], pc[k]).log_prob(xf)
                      for k in range(len(logw))], 1)
    return torch.bincount(lp.argmax(1), minlength=len(logw)).to(DT) / xf.shape[0]


def sw2(a, b, seed=123):
    """Sliced W2 with fixed projections (the same for every comparison)."""
    return float(sliced_wasserstein(a, b, n_projections=256, generator=torch.Generator().manual_seed(seed)))


def floor(exact, n, seed=0, pairs=3):
    """Mean sliced W2 between independent sets of ``n`` exact samples."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return sum(sw2(exact(n, g), exact(n, g)) for _ in range(pairs)) / pairs


def guided_samples(method, den, obs, n, nfe, seed=0, **options):
    """``n`` samples of ``method`` (a registered name, or None for the unguided prior) and the guided
    denoiser (None for the prior)."""
    g = torch.Generator().manual_seed(seed)
    model = den if method is None else get_guidance(method)(den, obs, **options)
    x = dk.sample(model, (n, *SHAPE), nfe=nfe, dtype=DT, generator=g)
    return x, (None if method is None else model)


METHODS = ("mmps", "reconstruction", "dps")


def run(n=2000, nfes=(10, 20, 50), operators=("mask", "dense"), seed=0):
    rows = []
    for opname in operators:
        den, obs, exact = gmm_problem(opname, seed=seed)
        fl = floor(exact, n, seed)
        ref = exact(n, torch.Generator().manual_seed(999))
        for nfe in nfes:
            prior, _ = guided_samples(None, den, obs, n, nfe, seed=1)
            for method in METHODS:
                t0 = time.perf_counter()
                x, model = guided_samples(method, den, obs, n, nfe, seed=1)
                dt = time.perf_counter() - t0
                w = sw2(x, ref)
                rows.append({"seed": seed, "operator": opname, "nfe": nfe, "method": method, "sw2": w, "floor": fl,
                             "ratio": w / fl, "prior_ratio": sw2(prior, ref) / fl,
                             "vjps_per_call": model.vjps / model.nfe, "seconds": dt})
    return rows


def duplicated_exact(counts, exact, generator):
    """Exact samples with the multiplicities ``counts`` of resampled members (``torch.unique``'s counts): as
    many distinct exact samples as there are distinct members, each repeated as often -- what duplicates
    alone cost."""
    return exact(len(counts), generator).repeat_interleave(counts, dim=0)


def run_smc(n=2000, nfes=(20, 100, 400), operators=("mask", "dense"), seed=0, methods=METHODS):
    """Twisted SMC (:func:`diffkit.smc.twisted_smc`) over each guidance method: sliced W2 against the
    floor and against exact samples with the same duplicates, the modes' weights, the final ESS."""
    from diffkit.smc import twisted_smc

    rows = []
    for opname in operators:
        den, obs, exact = gmm_problem(opname, seed=seed)
        fl = floor(exact, n, seed)
        ref = exact(n, torch.Generator().manual_seed(999))
        w = torch.softmax(exact.posterior[0], 0)
        plain, _ = guided_samples("mmps", den, obs, n, 20, seed=1)
        plain_err = float((mode_fractions(plain, exact.posterior) - w).abs().max())
        for nfe in nfes:
            for method in methods:
                model = get_guidance(method)(den, obs)
                seen = {}
                t0 = time.perf_counter()
                x = dk.sample(model, (n, *SHAPE), sampler=twisted_smc, nfe=nfe, dtype=DT,
                              generator=torch.Generator().manual_seed(1), callback=seen.update)
                dt = time.perf_counter() - t0
                _, counts = torch.unique(x.flatten(1), dim=0, return_counts=True)
                dup = duplicated_exact(counts, exact, torch.Generator().manual_seed(77))
                d = sw2(x, ref)
                rows.append({"seed": seed, "operator": opname, "nfe": nfe, "method": method, "sw2": d, "floor": fl,
                             "ratio": d / fl, "dup_ratio": sw2(dup, ref) / fl,
                             "mode_err": float((mode_fractions(x, exact.posterior) - w).abs().max()),
                             "plain_mode_err": plain_err, "final_ess": float(seen["final_ess"][0]),
                             "unique": len(counts) / n,
                             "vjps_per_call": model.vjps / model.nfe, "seconds": dt})
    return rows


def format_smc(rows) -> str:
    lines = ["| seed | operator | NFE | twist | sliced W2 | ratio to floor | exact, same duplicates: ratio | "
             "mode-weight error (plain MMPS at NFE 20) | final ESS | distinct members | VJPs per call | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['operator']} | {r['nfe']} | {r['method']} | {r['sw2']:.4f} | {r['ratio']:.2f} | "
                     f"{r['dup_ratio']:.2f} | {r['mode_err']:.3f} ({r['plain_mode_err']:.3f}) | {r['final_ess']:.0f} | "
                     f"{100 * r['unique']:.0f} % | {r['vjps_per_call']:.1f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


SWEEP = {"dps": ("zeta", (0.3, 1.0, 3.0, 10.0)), "reconstruction": ("gamma", (0.1, 0.3, 1.0, 3.0))}


def sweep(n=2000, nfe=20, operators=("mask", "dense"), seed=0) -> str:
    """Markdown table: ratio to the floor of DPS over zeta and reconstruction guidance over gamma."""
    lines = ["| operator | method | option = value: ratio to floor |", "|---|---|---|"]
    for opname in operators:
        den, obs, exact = gmm_problem(opname, seed=seed)
        fl = floor(exact, n, seed)
        ref = exact(n, torch.Generator().manual_seed(999))
        for method, (opt, values) in SWEEP.items():
            cells = []
            for v in values:
                x, _ = guided_samples(method, den, obs, n, nfe, seed=1, **{opt: v})
                cells.append(f"{opt} = {v:g}: {sw2(x, ref) / fl:.1f}")
            lines.append(f"| {opname} | {method} | {'; '.join(cells)} |")
    return "\n".join(lines) + "\n"


def format_markdown(rows) -> str:
    lines = ["| seed | operator | NFE | method | sliced W2 | floor | ratio to floor | prior's ratio | VJPs per call | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['operator']} | {r['nfe']} | {r['method']} | {r['sw2']:.4f} | {r['floor']:.4f} | "
                     f"{r['ratio']:.2f} | {r['prior_ratio']:.1f} | {r['vjps_per_call']:.1f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="samples per set")
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="draws of the problem (mixture, operator, y)")
    p.add_argument("--sweep", action="store_true", help="also sweep DPS's zeta and reconstruction's gamma")
    p.add_argument("--smc", type=int, nargs="*", default=None, metavar="NFE",
                   help="also twisted SMC over each method at these NFEs (default 20 100 400)")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = [r for seed in args.seeds for r in run(args.n, tuple(args.nfe), seed=seed)]
    table = format_markdown(rows)
    if args.sweep:
        table += "\n" + sweep(args.n, 20, seed=args.seeds[0])
    if args.smc is not None:
        nfes = tuple(args.smc) or (20, 100, 400)
        table += "\n" + format_smc([r for seed in args.seeds for r in run_smc(args.n, nfes, seed=seed)])
    print(table)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.markdown:
        from diffkit._io import atomic_write

        atomic_write(args.markdown, lambda f: f.write(table))
    return rows


if __name__ == "__main__":
    main()
