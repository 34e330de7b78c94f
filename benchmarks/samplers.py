"""Side-by-side benchmark of diffkit's samplers against diffusers' schedulers.

    python benchmarks/samplers.py [--quick] [--markdown FILE]

Four measurements.  The accuracy runs use two discrete T = 1000 schedules, DDPM's linear one
(beta 1e-4 .. 0.02) and diffusers' ``squaredcos_cap_v2`` cosine, with the very same
``alphas_cumprod`` on both sides (diffkit gets diffusers' array through ``from_alpha_bar``); a
diffusers configuration that raises (DPM++2M and UniPC with ``use_karras_sigmas`` on the cosine
schedule: IndexError / AssertionError in diffusers 0.42) is reported as "fail" in the tables.
diffkit's ``dpmpp_2s`` (DPM-Solver++(2S), a function of ``diffkit.samplers``) is included, and
``unipc`` both with its default ``order=2`` and as ``unipc-3`` (``order=3``, like diffusers' UniPC-3).

1. **Accuracy.**  Every method samples the same isotropic Gaussian mixture (K = 8 components,
   means of scale ~2, std 0.3) in d = 2 and d = 16 through the *same* exact denoiser
   E[x0 | x_t] (:class:`diffkit.analytic.GaussianMixtureDenoiser`), starting from the *same*
   noise ``x_init`` (float64), at NFE 5, 10, 20, 50, 100.  diffusers gets the exact denoiser
   wrapped as an epsilon-model of its own timestep (alpha_bar from the scheduler's own
   ``alphas_cumprod``; log sigma~ interpolated linearly for fractional timesteps, which is the
   inverse of diffusers' ``_sigma_to_t``).  The metric is the sliced-Wasserstein distance
   (:func:`diffkit.metrics.sliced_wasserstein`, fixed projections; evaluated by an equivalent
   faster routine checked against it) to exact samples from ``sample_data``; the "floor" is the
   distance between independent exact sample sets of the same size (mean of 3).  A second table
   gives the median per-sample distance to a very accurate solution of the probability-flow ODE
   from the same ``x_init`` (deterministic methods only; a diagnostic of integration error, not a
   target).  diffusers' HeunDiscreteScheduler spends 2n - 1 calls for n steps, so it gets the
   largest odd NFE not above the target; the tables print the NFE every method actually used.

2. **Sampler overhead.**  Time spent outside the model per denoiser call, with a denoiser that
   returns zeros, at batch 16 x 16, for complete sampling loops (diffusers: ``set_timesteps``
   + ``scale_model_input`` + ``step``; diffkit: :func:`diffkit.samplers.sample`), median of
   several repeats, the (tiny) time of the zero model itself subtracted.

3. **Narrow component.**  A two-component mixture (d = 8, linear schedule) with a wide (std 0.3)
   and a narrow (std 0.02) component: the ratio of the sampled narrow component's std to the
   true one, per method and NFE -- what a grid whose last denoiser call sits far above
   sigma~ = 0.02 loses (it collapses the component towards its mean).

4. **Overhead through a real Denoiser.**  As 2., but diffkit samples through a
   :class:`diffkit.Denoiser` whose backbone is a trivial module (``ZeroNet``), both with the
   ``x0_at`` fast path (per-grid coefficients) and through the plain ``denoiser(x, t)`` call,
   against diffusers' loop, all interleaved in one run; the network's own time is subtracted.
   The two diffkit paths must give bit-equal samples.

Targets (from the issues): at every NFE diffkit's best deterministic sampler is at least as
accurate as diffusers' best deterministic scheduler; diffkit's per-step overhead is at most
half of diffusers', also through a real Denoiser (DDIM, DPM++(2M), Euler).  The script always
exits with status 0.
"""
from __future__ import annotations

import argparse
import inspect
import math
import statistics
import sys
import time
import warnings

import numpy as np
import torch

from diffkit import samplers as dks
from diffkit.analytic import GaussianMixtureDenoiser
from diffkit.metrics import sliced_wasserstein
from diffkit.schedules import from_alpha_bar, linear

NFES = (5, 10, 20, 50, 100)
DIMS = (2, 16)
SCHEDULES = ("linear", "cosine")
DK_DETERMINISTIC = ("ddim", "dpmpp_2m", "dpmpp_3m", "euler", "heun", "dpmpp_2s", "unipc", "unipc-3")
NARROW_STD = 0.02  # the narrow component of the narrow-spread table


def _unipc3(denoiser, x, ts, **kw):
    """diffkit's unipc with a 3-point predictor (order=3), the counterpart of diffusers' UniPC-3."""
    return dks.unipc(denoiser, x, ts, order=3, **kw)


_unipc3.info = dks.unipc.info
BENCH_VARIANTS = {"unipc-3": _unipc3}  # benchmark labels for a registered sampler with non-default options


def dk_sampler(name):
    """A diffkit sampler by name: the registered ones, dpmpp_2s (a function in diffkit.samplers), and
    ``unipc-3`` (``unipc`` with ``order=3``)."""
    return BENCH_VARIANTS.get(name) or dks.BUILTIN_SAMPLERS.get(name) or getattr(dks, name)


def make_schedule(name: str):
    """``(diffkit schedule, diffusers config)`` of the same discrete T = 1000 schedule: DDPM's linear
    betas, or diffusers' ``squaredcos_cap_v2`` cosine (its own ``alphas_cumprod`` as a diffkit
    ``from_alpha_bar`` schedule, so both sides sample the very same process)."""
    if name == "linear":
        return linear(1000, 1e-4, 0.02), {}
    d = _diffusers()
    ac = d.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    return from_alpha_bar(ac.to(torch.float64)), {"beta_schedule": "squaredcos_cap_v2"}
SEED_MIX, SEED_REF, SEED_REF2, SEED_NOISE, SEED_PROJ, SEED_DDPM = 0, 1, 2, 3, 4, 5

BASE_CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                   prediction_type="epsilon", clip_sample=False)


# -- the problem -------------------------------------------------------------------------------
def make_mixture(d: int, schedule, K: int = 8, scale: float = 2.0, std: float = 0.3):
    g = torch.Generator().manual_seed(SEED_MIX + 1000 * d)
    means = scale * torch.randn(K, d, generator=g, dtype=torch.float64)
    return GaussianMixtureDenoiser(schedule, means, std)


class _FixedCoeffs:
    """Schedule stand-in whose ``coeffs`` ignore t and return a set (alpha, sigma): lets diffusers'
    wrapper evaluate the very same GaussianMixtureDenoiser code at diffusers' own noise level."""

    T = None

    def __init__(self):
        self.a = 1.0
        self.s = 0.0

    def coeffs(self, t):
        return torch.full_like(t, self.a), torch.full_like(t, self.s)


class EpsModel:
    """The exact mixture denoiser as a diffusers epsilon-model ``eps(x_t, timestep)``.

    ``x_t`` is the model input after ``scale_model_input`` (VP scaling for every scheduler
    here), ``timestep`` diffusers' train-step index tau in 0..999, possibly fractional.
    alpha_bar(tau) comes from the scheduler's ``alphas_cumprod``, with log sigma~ =
    log sqrt((1 - ab)/ab) interpolated linearly in tau (what ``_sigma_to_t`` inverts)."""

    def __init__(self, gmm: GaussianMixtureDenoiser, alphas_cumprod: torch.Tensor):
        self.coef = _FixedCoeffs()
        self.gmm = GaussianMixtureDenoiser(self.coef, gmm.means, gmm.stds)
        self.gmm.log_w = gmm.log_w
        ac = alphas_cumprod.to(torch.float64)
        self.log_sig = 0.5 * (torch.log1p(-ac) - ac.log())
        self.calls = 0

    def alpha_bar(self, tau: float) -> float:
        T = self.log_sig.numel()
        tau = min(max(float(tau), 0.0), T - 1.0)
        i = min(int(math.floor(tau)), T - 2)
        w = tau - i
        ls = (1 - w) * float(self.log_sig[i]) + w * float(self.log_sig[i + 1])
        return 1.0 / (1.0 + math.exp(2 * ls))

    def __call__(self, x: torch.Tensor, timestep) -> torch.Tensor:
        self.calls += 1
        ab = self.alpha_bar(timestep)
        a, s = math.sqrt(ab), math.sqrt(1.0 - ab)
        self.coef.a, self.coef.s = a, s
        x0 = self.gmm(x, 0.0)
        return (x - a * x0) / s


# -- diffusers ---------------------------------------------------------------------------------
def _diffusers():
    import diffusers
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    return diffusers


def _config(cls, **extra):
    params = inspect.signature(cls.__init__).parameters
    cfg = {k: v for k, v in BASE_CONFIG.items() if k in params}
    cfg.update(extra)
    return cfg


def diffusers_methods(quick: bool):
    """(label, scheduler class name, extra config, deterministic) for every diffusers run."""
    sp3 = ("leading", "linspace", "trailing")
    m = [("DDPM/leading", "DDPMScheduler", {}, False)]
    m += [(f"DDIM/{s}", "DDIMScheduler", {"timestep_spacing": s}, True) for s in sp3]
    m += [(f"DPM++2M/{s}", "DPMSolverMultistepScheduler", {"timestep_spacing": s}, True) for s in sp3]
    m += [("DPM++2M/karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, True),
          ("DPM++2M/lu", "DPMSolverMultistepScheduler", {"use_lu_lambdas": True}, True),
          ("DPM++3M/trailing", "DPMSolverMultistepScheduler",
           {"solver_order": 3, "timestep_spacing": "trailing"}, True)]
    m += [(f"Euler/{s}", "EulerDiscreteScheduler", {"timestep_spacing": s}, True) for s in sp3]
    m += [("Euler/karras", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, True)]
    m += [(f"Heun/{s}", "HeunDiscreteScheduler", {"timestep_spacing": s}, True) for s in sp3]
    m += [("Heun/karras", "HeunDiscreteScheduler", {"use_karras_sigmas": True}, True)]
    m += [(f"UniPC/{s}", "UniPCMultistepScheduler", {"timestep_spacing": s}, True) for s in sp3]
    m += [("UniPC/karras", "UniPCMultistepScheduler", {"use_karras_sigmas": True}, True),
          ("UniPC-3/trailing", "UniPCMultistepScheduler", {"solver_order": 3, "timestep_spacing": "trailing"}, True)]
    if quick:
        keep = {"DDPM/leading", "DDIM/trailing", "DDIM/leading", "DPM++2M/linspace", "DPM++2M/karras",
                "Euler/karras", "Heun/karras", "UniPC/linspace", "UniPC/karras"}
        m = [x for x in m if x[0] in keep]
    return m


def diffusers_steps(cls_name: str, nfe: int) -> int:
    """num_inference_steps whose NFE is closest to ``nfe`` without exceeding it.

    HeunDiscreteScheduler with n steps calls the model 2n - 1 times (n - 1 Heun steps and a
    final Euler step onto sigma = 0); every other scheduler here calls it once per step."""
    if cls_name == "HeunDiscreteScheduler":
        return max(1, (nfe + 1) // 2)
    return nfe


def run_diffusers(scheduler, model, x_init: torch.Tensor, steps: int, generator=None) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x = x_init * scheduler.init_noise_sigma
    kw = {"generator": generator} if generator is not None else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            xin = scheduler.scale_model_input(x, t)
            eps = model(xin, t)
            x = scheduler.step(eps, t, x, return_dict=False, **kw)[0]
    return x


# -- accuracy ----------------------------------------------------------------------------------
class SlicedW:
    """``diffkit.metrics.sliced_wasserstein(x, ref, n_proj, generator=<seed SEED_PROJ>)`` for equal-size
    sets, computed faster: the same projections, but the reference's sorted projections are cached
    and the sort runs along contiguous rows (numpy).  Checked against diffkit's function on the first
    call, to 1e-9 relative."""

    def __init__(self, ref: torch.Tensor, n_proj: int):
        d = ref[0].numel()
        theta = torch.randn(d, n_proj, generator=torch.Generator().manual_seed(SEED_PROJ), dtype=torch.float64)
        self.theta = theta / theta.norm(dim=0, keepdim=True)
        self.ref, self.n_proj = ref, n_proj
        self.ref_sorted = np.sort(self.project(ref), axis=1)
        self.checked = False

    def project(self, x: torch.Tensor) -> np.ndarray:
        """(n_proj, N) projections."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        return (self.theta.T @ x.T).contiguous().numpy()

    def __call__(self, x: torch.Tensor) -> float:
        if x.shape[0] != self.ref.shape[0]:
            raise ValueError("SlicedW needs sets of equal size")
        v = float(np.sqrt(np.mean((np.sort(self.project(x), axis=1) - self.ref_sorted) ** 2)))
        if not self.checked:
            exact = float(sliced_wasserstein(x, self.ref, n_projections=self.n_proj,
                                             generator=torch.Generator().manual_seed(SEED_PROJ)))
            if not math.isclose(v, exact, rel_tol=1e-9, abs_tol=1e-12):
                raise AssertionError(f"fast sliced Wasserstein {v} differs from diffkit's {exact}")
            self.checked = True
        return v

    def paired_bootstrap_se(self, xa, xb, n_boot: int, n_proj: int = 128) -> float:
        """Standard error of SW(xa) - SW(xb) from a paired bootstrap: the same resampled indices
        for xa and xb (they come from the same x_init) and resampled reference samples.  Uses
        the first ``n_proj`` projections only, to keep it cheap."""
        g = np.random.default_rng(SEED_PROJ + 1)
        pa, pb, pr = (self.project(v)[:n_proj] for v in (xa, xb, self.ref))
        n, m = pa.shape[1], pr.shape[1]
        diffs = []
        for _ in range(n_boot):
            i, j = g.integers(0, n, n), g.integers(0, m, m)
            r = np.sort(pr[:, j], axis=1)
            da = np.sqrt(np.mean((np.sort(pa[:, i], axis=1) - r) ** 2))
            db = np.sqrt(np.mean((np.sort(pb[:, i], axis=1) - r) ** 2))
            diffs.append(da - db)
        return float(np.std(diffs, ddof=1))


def ode_dist(x, y):
    """Median per-sample distance: robust to the odd trajectory that ends in another mixture
    component (one such sample dominates an RMS)."""
    return float((x - y).norm(dim=1).median())


def ode_reference(D, x_init, n_steps: int):
    """Heun with many steps in Karras spacing down to sigma~ = 1e-4 (a tight reference)."""
    ts = dks.timesteps(D.schedule, n_steps, "karras", sigma_min=1e-4)
    with torch.no_grad():
        return dks.heun(D, x_init.clone(), ts)


def diffkit_methods(quick: bool):
    """(sampler name, spacing, deterministic, extra options) of every diffkit run."""
    dk_methods = [("ddpm", None, False, {})]
    for name in DK_DETERMINISTIC:
        dflt = dk_sampler(name).info.default_spacing
        dk_methods.append((name, dflt, True, {}))
        others = ("uniform", "quadratic") if quick else dks.SPACINGS  # quick: fewer spacings
        if name == "dpmpp_2s":
            others = ("karras",)
        dk_methods += [(name, s, True, {}) for s in others if s != dflt]
        if not quick and name != "dpmpp_2s":  # noise-level spacings started at t = 1 instead of sigma~ = 80
            dk_methods += [(name, s, True, {"sigma_max": None}) for s in ("karras", "logsnr")]
    return dk_methods


def _dk_label(name, spacing, kw):
    label = name if spacing is None else f"{name}/{spacing}"
    if spacing == dk_sampler(name).info.default_spacing:
        label += "*"
    if kw:
        label += "@t1"
    return label


def _run_diffusers_safe(diffusers, label, cls_name, extra, det, nfe, D, x_init, sched_cfg):
    """(x or None, calls, error text): a config diffusers cannot run is recorded as a failure."""
    cls = getattr(diffusers, cls_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler = cls(**_config(cls, **{**sched_cfg, **extra}))
            model = EpsModel(D, scheduler.alphas_cumprod)
            g = torch.Generator().manual_seed(SEED_DDPM)
            x = run_diffusers(scheduler, model, x_init.clone(), diffusers_steps(cls_name, nfe),
                              generator=None if det else g)
        return x.to(torch.float64), model.calls, None
    except Exception as e:  # noqa: BLE001 -- reported in the table
        return None, 0, f"{type(e).__name__}: {e}"


def accuracy(d: int, N: int, n_proj: int, quick: bool, log, schedule: str = "linear"):
    diffusers = _diffusers()
    sched, sched_cfg = make_schedule(schedule)
    D = make_mixture(d, sched)
    ref = D.sample_data(N, torch.Generator().manual_seed(SEED_REF))
    sw = SlicedW(ref, n_proj)
    floors = [sw(D.sample_data(N, torch.Generator().manual_seed(SEED_REF2 + 100 * k)))
              for k in range(3)]
    floor = statistics.mean(floors)
    x_init = torch.randn(N, d, generator=torch.Generator().manual_seed(SEED_NOISE), dtype=torch.float64)
    t0 = time.perf_counter()
    x_ode = ode_reference(D, x_init, 300 if quick else 500)
    log(f"  [{schedule}, d={d}] ODE reference: {time.perf_counter() - t0:.1f}s;  floor SW = {floor:.4f} "
        f"(3 exact sets: {min(floors):.4f}..{max(floors):.4f}), "
        f"SW(ODE reference) = {sw(x_ode):.4f}")

    rows = []  # dicts: side, label, det, nfe, actual, sw, err

    def record(side, label, det, nfe, actual, x):
        bad = not bool(torch.isfinite(x).all())
        rows.append(dict(side=side, label=label, det=det, nfe=nfe, actual=actual,
                         sw=float("nan") if bad else sw(x),
                         err=float("nan") if bad else ode_dist(x, x_ode), x=x))

    # diffkit
    t0 = time.perf_counter()
    for name, spacing, det, kw in diffkit_methods(quick):
        label = _dk_label(name, spacing, kw)
        for nfe in NFES:
            D.nfe = 0
            g = torch.Generator().manual_seed(SEED_DDPM)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Heun's low-NFE warning: its result is in the table
                x = dks.sample(D, (N, d), sampler=dk_sampler(name), nfe=nfe, spacing=spacing, x_init=x_init.clone(),
                               generator=g, dtype=torch.float64, **kw)
            record("diffkit", label, det, nfe, D.nfe, x)
    log(f"  [{schedule}, d={d}] diffkit runs: {time.perf_counter() - t0:.1f}s")

    # diffusers
    t0 = time.perf_counter()
    for label, cls_name, extra, det in diffusers_methods(quick):
        for nfe in NFES:
            x, calls, err = _run_diffusers_safe(diffusers, label, cls_name, extra, det, nfe, D, x_init, sched_cfg)
            if x is not None:
                record("diffusers", label, det, nfe, calls, x)
            else:
                log(f"  [{schedule}, d={d}] {label} NFE {nfe}: {err}")
                rows.append(dict(side="diffusers", label=label, det=det, nfe=nfe, actual=0,
                                 sw=float("nan"), err=float("nan"), x=None))
    log(f"  [{schedule}, d={d}] diffusers runs: {time.perf_counter() - t0:.1f}s")
    return floor, sw, rows


def narrow(N: int, quick: bool, log, d: int = 8):
    """Narrow-spread table: a two-component mixture on the linear schedule, a wide component
    (std 0.3) at -1.5 e_1 and a narrow one (std ``NARROW_STD``) at +1.5 e_1; the ratio of the
    sampled narrow component's std (pooled over the d - 1 directions orthogonal to e_1, samples
    with x_1 > 0.75) to the true one, per method and NFE.  1 is exact; a grid whose last call is
    far above sigma~ = 0.02 collapses the component towards its mean (ratio << 1)."""
    diffusers = _diffusers()
    sched, sched_cfg = make_schedule("linear")
    means = torch.zeros(2, d, dtype=torch.float64)
    means[0, 0], means[1, 0] = -1.5, 1.5
    D = GaussianMixtureDenoiser(sched, means, [0.3, NARROW_STD])
    x_init = torch.randn(N, d, generator=torch.Generator().manual_seed(SEED_NOISE + 7), dtype=torch.float64)

    def ratio(x):
        if x is None or not bool(torch.isfinite(x).all()):
            return float("nan")
        sel = x[:, 0] > 0.75
        if int(sel.sum()) < 10:
            return float("nan")
        return float(x[sel][:, 1:].var(0).mean().sqrt()) / NARROW_STD

    rows = []
    methods = [("ddpm", None, False, {})] + [(n, dk_sampler(n).info.default_spacing, True, {}) for n in DK_DETERMINISTIC]
    methods += [("dpmpp_2m", "uniform", True, {}), ("dpmpp_2m", "karras", True, {}), ("heun", "karras", True, {})]
    t0 = time.perf_counter()
    for name, spacing, det, kw in methods:
        for nfe in NFES:
            D.nfe = 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x = dks.sample(D, (N, d), sampler=dk_sampler(name), nfe=nfe, spacing=spacing, x_init=x_init.clone(),
                               generator=torch.Generator().manual_seed(SEED_DDPM), dtype=torch.float64, **kw)
            rows.append(dict(side="diffkit", label=_dk_label(name, spacing, kw), det=det, nfe=nfe, actual=D.nfe,
                             narrow=ratio(x)))
    for label, cls_name, extra, det in diffusers_methods(True):
        for nfe in NFES:
            x, calls, err = _run_diffusers_safe(diffusers, label, cls_name, extra, det, nfe, D, x_init, sched_cfg)
            if err:
                log(f"  [narrow] {label} NFE {nfe}: {err}")
            rows.append(dict(side="diffusers", label=label, det=det, nfe=nfe, actual=calls, narrow=ratio(x)))
    log(f"  [narrow] runs: {time.perf_counter() - t0:.1f}s")
    return rows


STD_CASES = [  # (sampler, NFE, options) of the std-ratio table (the defaults first)
    ("dpmpp_2m", 20, {}), ("dpmpp_2m", 10, {}), ("dpmpp_2m", 8, {}),
    ("dpmpp_2m", 20, {"spacing": "uniform"}), ("dpmpp_2m", 8, {"spacing": "uniform"}),
    ("dpmpp_2m", 10, {"sigma_min": 2e-3}), ("dpmpp_2m", 10, {"sigma_min": 5e-4}), ("dpmpp_2m", 10, {"spacing": "karras"}),
    ("dpmpp_3m", 10, {}), ("dpmpp_3m", 20, {}),
    ("ddim", 20, {}), ("ddim", 50, {}), ("ddim", 100, {}), ("ddpm", 20, {}), ("ddpm", 100, {}),
    ("euler", 50, {}), ("euler", 20, {"churn": 2.5}), ("euler", 50, {"churn": 2.5}),
    ("heun", 21, {}), ("heun", 35, {}), ("heun", 51, {}), ("heun", 21, {"spacing": "karras"}),
    ("heun", 35, {"spacing": "karras"}), ("heun", 21, {"churn": 2.5}), ("heun", 51, {"churn": 2.5}),
    ("dpmpp_2s", 11, {}), ("dpmpp_2s", 21, {}), ("dpmpp_2s", 31, {}),
    ("dpmpp_2s", 21, {"churn": 2.5, "churn_noise": 1.05}), ("dpmpp_2s", 31, {"churn": 2.5, "churn_noise": 1.05}),
    ("unipc", 10, {}), ("unipc", 20, {}), ("unipc", 10, {"order": 3}), ("unipc", 20, {"order": 3}),
]


def std_ratios(log, stds=(1.0, 0.1, 0.03, 0.01), N: int = 4000, d: int = 64):
    """Sampled std / true std on Gaussian data N(0, s^2 I) through the exact denoiser
    (``diffkit.GaussianDenoiser``), 4000 x 64 samples, float64 (std SE 0.14 %), for the cosine,
    linear (T = 1000) and sigmoid schedules: the measurement behind the sampler defaults."""
    from diffkit import GaussianDenoiser
    from diffkit.schedules import cosine, sigmoid

    scheds = {"cosine": cosine(), "linear": linear(1000, 1e-4, 0.02), "sigmoid": sigmoid()}
    header = ["schedule", "sampler", "NFE", "options"] + [f"s = {s:g}" for s in stds]
    rows = []
    for sname, sch in scheds.items():
        for name, nfe, opts in STD_CASES:
            vals = []
            for s in stds:
                den = GaussianDenoiser(sch, torch.zeros(d, dtype=torch.float64), s)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    x = dks.sample(den, (N, d), sampler=dk_sampler(name), nfe=nfe, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(0), **opts)
                vals.append(f"{float(x.std()) / s:.3f}")
            rows.append([sname, name, nfe, ", ".join(f"{k}={v}" for k, v in opts.items()) or "default"] + vals)
        log(f"  [std ratios] {sname} done")
    return header, rows


def best(rows, side, nfe):
    cand = [r for r in rows if r["side"] == side and r["det"] and r["nfe"] == nfe and math.isfinite(r["sw"])]
    return min(cand, key=lambda r: r["sw"]) if cand else None


# -- overhead ----------------------------------------------------------------------------------
class ZeroDenoiser:
    def __init__(self, schedule):
        self.schedule = schedule

    def __call__(self, x, t):
        return torch.zeros_like(x)


def zero_eps(x, t):
    return torch.zeros_like(x)


OVERHEAD_PAIRS = [  # (diffkit sampler, diffusers scheduler, diffusers extra config)
    ("ddpm", "DDPMScheduler", {}),
    ("ddim", "DDIMScheduler", {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {}),
    ("euler", "EulerDiscreteScheduler", {}),
    ("heun", "HeunDiscreteScheduler", {}),
    ("dpmpp_2m", "UniPCMultistepScheduler", {}),
]


def _times(fns, repeats):
    """The wall times of ``repeats`` calls of each callable (after one warm-up call of each), timed
    interleaved (one call of each per round) so that load from elsewhere on the machine hits all of
    them alike."""
    for fn in fns:  # warm-up
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def _median_times(fns, repeats):
    """Median wall time of each callable (:func:`_times`)."""
    return [statistics.median(t) for t in _times(fns, repeats)]


def overhead(nfe: int, repeats: int, B: int = 16, d: int = 16):
    """Per-NFE time outside the model (µs) for each diffkit/diffusers pair at default settings,
    with the part spent building the time grid (diffkit ``timesteps``, diffusers
    ``set_timesteps``) shown separately."""
    diffusers = _diffusers()
    sched = linear(1000, 1e-4, 0.02)
    Z = ZeroDenoiser(sched)
    x_init = torch.randn(B, d, generator=torch.Generator().manual_seed(SEED_NOISE))
    xz = torch.zeros(B, d)
    (t_model,) = _median_times([lambda: [Z(xz, 0.5) for _ in range(nfe)]], repeats)
    t_model /= nfe
    out = []
    for dk_name, cls_name, extra in OVERHEAD_PAIRS:
        g = torch.Generator().manual_seed(SEED_DDPM)
        dg = g if cls_name == "DDPMScheduler" else None
        info = dks.BUILTIN_SAMPLERS[dk_name].info
        n_dk = info.plan(nfe)[0]
        cls = getattr(diffusers, cls_name)
        scheduler = cls(**_config(cls, **extra))
        steps = diffusers_steps(cls_name, nfe)
        counter = {"n": 0}

        def model(x, t):
            counter["n"] += 1
            return zero_eps(x, t)

        run_diffusers(scheduler, model, x_init, steps, generator=dg)
        nfe_df = counter["n"]
        warnings.filterwarnings("ignore", message="heun with NFE")  # timing only: Heun's low-NFE warning
        t_dk, g_dk, t_df, g_df = _median_times([
            lambda: dks.sample(Z, (B, d), sampler=dk_sampler(dk_name), nfe=nfe, x_init=x_init, generator=g),
            lambda: dks.timesteps(sched, n_dk, info.default_spacing),
            lambda: run_diffusers(scheduler, zero_eps, x_init, steps, generator=dg),
            lambda: scheduler.set_timesteps(steps),
        ], repeats)
        us = lambda t, n: max(t / n - t_model, 0.0) * 1e6
        out.append(dict(dk=f"{dk_name}/{info.default_spacing}", df=cls_name, nfe=nfe, nfe_df=nfe_df,
                        us_dk=us(t_dk, nfe), us_df=us(t_df, nfe_df),
                        grid_dk=g_dk / nfe * 1e6, grid_df=g_df / nfe_df * 1e6))
        out[-1]["ratio"] = out[-1]["us_dk"] / out[-1]["us_df"] if out[-1]["us_df"] > 0 else float("inf")
    return t_model * 1e6, out


class ZeroNet(torch.nn.Module):
    """Trivial backbone with the diffkit signature: zeros shaped like x (no parameters used)."""

    def forward(self, x, c_noise, scalars=None, labels=None):
        return torch.zeros_like(x)


class PlainCall:
    """A denoiser seen through the plain ``denoiser(x, t)`` contract only (no ``x0_at``)."""

    def __init__(self, den):
        self.den, self.schedule = den, den.schedule

    def __call__(self, x, t, **kw):
        return self.den(x, t, **kw)


DENOISER_PAIRS = [("ddim", "DDIMScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler"),
                  ("euler", "EulerDiscreteScheduler")]


def overhead_denoiser(nfe: int, repeats: int, B: int = 16, d: int = 16):
    """Per-NFE time outside the network (µs) when diffkit samples through a real
    :class:`diffkit.Denoiser` (eps-parameterised, trivial ``ZeroNet`` backbone), with and without
    its ``x0_at`` fast path, against diffusers' loop around a zero eps-model; everything timed
    interleaved in one run.  The network's own time (``ZeroNet`` called ``nfe`` times) is
    subtracted from diffkit, the zero model's from diffusers."""
    from diffkit.denoiser import Denoiser

    diffusers = _diffusers()
    sched = linear(1000, 1e-4, 0.02)
    net = ZeroNet()
    den = Denoiser(net, sched, "eps")
    plain = PlainCall(den)
    x_init = torch.randn(B, d, generator=torch.Generator().manual_seed(SEED_NOISE))
    xz, cz = torch.zeros(B, d), torch.zeros(B)
    t_net, t_model = _median_times([lambda: [net(xz, cz) for _ in range(nfe)],
                                    lambda: [zero_eps(xz, 0.5) for _ in range(nfe)]], repeats)
    t_net, t_model = t_net / nfe, t_model / nfe
    out = []
    for dk_name, cls_name in DENOISER_PAIRS:
        cls = getattr(diffusers, cls_name)
        scheduler = cls(**_config(cls))
        with torch.no_grad():
            a = dks.sample(den, (B, d), sampler=dk_sampler(dk_name), nfe=nfe, x_init=x_init)
            b = dks.sample(plain, (B, d), sampler=dk_sampler(dk_name), nfe=nfe, x_init=x_init)
        same = bool(torch.equal(a, b))
        t_fast, t_plain, t_df = _median_times([
            lambda: dks.sample(den, (B, d), sampler=dk_sampler(dk_name), nfe=nfe, x_init=x_init),
            lambda: dks.sample(plain, (B, d), sampler=dk_sampler(dk_name), nfe=nfe, x_init=x_init),
            lambda: run_diffusers(scheduler, zero_eps, x_init, nfe),
        ], repeats)
        us_fast = max(t_fast / nfe - t_net, 0.0) * 1e6
        us_plain = max(t_plain / nfe - t_net, 0.0) * 1e6
        us_df = max(t_df / nfe - t_model, 0.0) * 1e6
        out.append(dict(nfe=nfe, dk=f"{dk_name}/{dks.BUILTIN_SAMPLERS[dk_name].info.default_spacing}",
                        df=cls_name, us_fast=us_fast, us_plain=us_plain, us_df=us_df, same=same,
                        ratio=us_fast / us_df if us_df > 0 else float("inf"),
                        ratio_plain=us_plain / us_df if us_df > 0 else float("inf")))
    return t_net * 1e6, out


DK_ALL = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2s", "dpmpp_3m", "euler", "heun", "unipc", "unipc-3")


def overhead_all(nfe: int, repeats: int, B: int = 16, d: int = 16):
    """Per-NFE time outside the network (µs) of every diffkit sampler at its default settings,
    through a :class:`diffkit.Denoiser` (``x0_at`` fast path, trivial ``ZeroNet``) and through the
    plain zero denoiser ``ZeroDenoiser``, all timed interleaved; no diffusers.  The table behind
    the before -> after comparison of a change to the samplers' update formulas."""
    from diffkit.denoiser import Denoiser

    sched = linear(1000, 1e-4, 0.02)
    net = ZeroNet()
    den, Z = Denoiser(net, sched, "eps"), ZeroDenoiser(sched)
    x_init = torch.randn(B, d, generator=torch.Generator().manual_seed(SEED_NOISE))
    xz, cz = torch.zeros(B, d), torch.zeros(B)
    t_net, t_zero = _median_times([lambda: [net(xz, cz) for _ in range(nfe)],
                                   lambda: [Z(xz, 0.5) for _ in range(nfe)]], repeats)
    t_net, t_zero = t_net / nfe, t_zero / nfe
    warnings.filterwarnings("ignore", message="heun with NFE")
    fns = []
    for name in DK_ALL:
        fn = dk_sampler(name)
        g = torch.Generator().manual_seed(SEED_DDPM)
        fns += [lambda fn=fn, g=g: dks.sample(den, (B, d), sampler=fn, nfe=nfe, x_init=x_init, generator=g),
                lambda fn=fn, g=g: dks.sample(Z, (B, d), sampler=fn, nfe=nfe, x_init=x_init, generator=g)]
    times = _median_times(fns, repeats)
    out = []
    for k, name in enumerate(DK_ALL):
        out.append(dict(nfe=nfe, dk=name, us_den=max(times[2 * k] / nfe - t_net, 0.0) * 1e6,
                        us_zero=max(times[2 * k + 1] / nfe - t_zero, 0.0) * 1e6))
    return out


def overhead_against(old_path: str, nfe: int, repeats: int, B: int = 16, d: int = 16):
    """Before -> after: every diffkit sampler of ``diffkit.samplers`` against the same sampler of
    another version of the module (``old_path``, e.g. ``git show REV:diffkit/samplers.py > old.py``,
    loaded as a module of the installed diffkit package), through a :class:`diffkit.Denoiser`
    (``x0_at`` path, ``ZeroNet``) and the plain zero denoiser, all four timed interleaved; the
    *best* of ``repeats`` loops each (on a loaded machine the minimum is the stable statistic, as
    ``timeit`` recommends).  Also the largest difference between the two versions' samples."""
    import importlib.util

    from diffkit.denoiser import Denoiser

    spec = importlib.util.spec_from_file_location("diffkit._samplers_before", old_path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    sched = linear(1000, 1e-4, 0.02)
    den, Z = Denoiser(ZeroNet(), sched, "eps"), ZeroDenoiser(sched)
    x_init = torch.randn(B, d, generator=torch.Generator().manual_seed(SEED_NOISE))
    warnings.filterwarnings("ignore", message="heun with NFE")
    out = []
    for name in DK_ALL:
        new_fn = dk_sampler(name)
        old_fn = getattr(old, name.removesuffix("-3"))
        if name == "unipc-3":
            old_fn = (lambda f: lambda *a, **k: f(*a, order=3, **k))(old_fn)
            old_fn.info = new_fn.info
        run = lambda fn, D: dks.sample(D, (B, d), sampler=fn, nfe=nfe, x_init=x_init,
                                       generator=torch.Generator().manual_seed(SEED_DDPM))
        fns = [lambda f=f, D=D: run(f, D) for D in (den, Z) for f in (old_fn, new_fn)]
        us = [min(t) / nfe * 1e6 for t in _times(fns, repeats)]
        diff = float((run(old_fn, den) - run(new_fn, den)).abs().max())
        out.append(dict(nfe=nfe, dk=name, den=us[:2], zero=us[2:], diff=diff))
    return out


# -- reporting ---------------------------------------------------------------------------------
def fmt_table(header, rows, align=None):
    cols = list(zip(*([header] + rows)))
    widths = [max(len(str(c)) for c in col) for col in cols]
    align = align or ["<"] + [">"] * (len(header) - 1)
    line = lambda r: "  ".join(f"{str(c):{a}{w}}" for c, a, w in zip(r, align, widths))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def method_table(rows, key="sw"):
    labels = []
    for r in rows:
        if (r["side"], r["label"]) not in labels:
            labels.append((r["side"], r["label"]))
    header = ["side", "method", "det"] + [f"NFE {n}" for n in NFES] + ["actual NFE"]
    out = []
    for side, label in labels:
        rs = {r["nfe"]: r for r in rows if r["side"] == side and r["label"] == label}
        vals = [f"{rs[n][key]:.4f}" if math.isfinite(rs[n][key]) else "fail" for n in NFES]
        act = [rs[n]["actual"] for n in NFES]
        det = "yes" if rs[NFES[0]]["det"] else "no"
        out.append([side, label, det] + vals + ["=" if act == list(NFES) else "/".join(map(str, act))])
    return header, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer samples, configs and repeats (~1 minute)")
    p.add_argument("--markdown", metavar="FILE", help="also write the results as Markdown tables to FILE")
    p.add_argument("--samples", type=int, default=None, help="samples per method (default 4000, quick 1000)")
    p.add_argument("--std-ratios", action="store_true",
                   help="only the exact-denoiser std-ratio table behind the sampler defaults (~1-2 minutes)")
    p.add_argument("--overhead", action="store_true",
                   help="only the overhead of every diffkit sampler (no diffusers, no accuracy; ~1 minute)")
    p.add_argument("--against", metavar="OLD_SAMPLERS_PY",
                   help="with --overhead: time every sampler before -> after against this version of "
                        "diffkit/samplers.py (git show REV:diffkit/samplers.py > old.py), interleaved, best of the loops")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: steadier timings, and small batches gain nothing)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    N = args.samples or (1000 if quick else 4000)
    n_proj = 256 if quick else 1024
    n_boot = 20 if quick else 30
    repeats = 15 if quick else 41
    t_start = time.perf_counter()
    log = lambda s: print(s, flush=True)
    if args.std_ratios:
        h, t = std_ratios(log)
        log(fmt_table(h, t, ["<", "<", ">", "<"] + [">"] * (len(h) - 4)))
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write("# Sampled / true std on Gaussian data (exact denoiser, 4000 x 64, float64)\n\n"
                        + md_table(h, t) + "\n")
        return 0
    if args.overhead and args.against:
        h = ["NFE", "sampler", "Denoiser (x0_at): before", "after", "change", "zero denoiser: before", "after",
             "change", "max |after - before|"]
        rows = []
        for nfe in (10, 20, 100):
            for r in overhead_against(args.against, nfe, repeats):
                (b1, a1), (b2, a2) = r["den"], r["zero"]
                rows.append([r["nfe"], r["dk"], f"{b1:.1f}", f"{a1:.1f}", f"{a1 / b1 - 1:+.1%}", f"{b2:.1f}",
                             f"{a2:.1f}", f"{a2 / b2 - 1:+.1%}", f"{r['diff']:.1e}"])
        note = (f"time per denoiser call, µs (trivial networks: almost all of it is the sampler's own), best of "
                f"{repeats} complete sampling loops of batch 16 x 16, the four of each row timed interleaved; before = "
                f"{args.against}; torch {torch.__version__}, {args.threads} thread(s)")
        log(note)
        log(fmt_table(h, rows, [">", "<"] + [">"] * 7))
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(f"# diffkit sampler overhead, before -> after\n\n{note}\n\n" + md_table(h, rows) + "\n")
        return 0
    if args.overhead:
        h = ["NFE", "sampler", "us/NFE Denoiser (x0_at)", "us/NFE zero denoiser"]
        rows = [[r["nfe"], r["dk"], f"{r['us_den']:.1f}", f"{r['us_zero']:.1f}"]
                for nfe in (10, 20, 100) for r in overhead_all(nfe, repeats)]
        note = (f"time outside the network per denoiser call, median of {repeats} complete sampling loops of "
                f"batch 16 x 16, all timed interleaved; torch {torch.__version__}, {args.threads} thread(s)")
        log(note)
        log(fmt_table(h, rows, [">", "<", ">", ">"]))
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(f"# diffkit sampler overhead\n\n{note}\n\n" + md_table(h, rows) + "\n")
        return 0
    title = f"diffkit vs diffusers {_diffusers().__version__} samplers ({'quick' if quick else 'full'} run)"
    setup = (f"linear DDPM schedule (T=1000, beta 1e-4..0.02) and diffusers' squaredcos_cap_v2 cosine (T=1000), the "
             f"same alphas_cumprod on both sides; exact GMM denoiser, K=8, std 0.3; N={N} samples, "
             f"float64; SW with {n_proj} fixed projections; torch {torch.__version__}, {args.threads} thread(s)")
    md = [f"# {title}", "", setup, ""]
    log(title + "\n" + setup)

    summary_acc = []
    for schedule, d in [(sc, d) for sc in SCHEDULES for d in DIMS]:
        log(f"\n== accuracy, {schedule} schedule, d = {d} ==")
        floor, sw, rows = accuracy(d, N, n_proj, quick, log, schedule)
        h, t = method_table(rows, "sw")
        log(f"\nSliced-Wasserstein distance to exact samples (floor, SW between exact sample sets: {floor:.4f}; "
            "* marks a diffkit sampler's default spacing; @t1: noise-level spacing started at t = 1, sigma_max=None)")
        log(fmt_table(h, t, ["<", "<", "<"] + [">"] * (len(h) - 3)))
        md += [f"## Accuracy, {schedule} schedule, d = {d}", "", f"Sliced-Wasserstein distance to exact samples (floor, SW between "
               f"exact sample sets of the same size: {floor:.4f}; * marks a diffkit sampler's default spacing; @t1: started at t = 1 with sigma_max=None).",
               "", md_table(h, t), ""]
        h2, t2 = method_table([r for r in rows if r["det"]], "err")
        log("\nMedian distance to an accurate probability-flow ODE solution from the same noise "
            "(deterministic methods; diagnostic)")
        log(fmt_table(h2, t2, ["<", "<", "<"] + [">"] * (len(h2) - 3)))
        md += ["Median per-sample distance to an accurate probability-flow ODE solution from the same noise "
               "(diagnostic):", "", md_table(h2, t2), ""]
        for nfe in NFES:
            bk, bf = best(rows, "diffkit", nfe), best(rows, "diffusers", nfe)
            if bk is None or bf is None:
                summary_acc.append([schedule, d, nfe, "-", "-", "-", "-", "-", "-", "-", f"{floor:.4f}",
                                    "FAIL (no result)" if bk is None else "PASS"])
                continue
            diff = bk["sw"] - bf["sw"]
            se = sw.paired_bootstrap_se(bk["x"], bf["x"], n_boot)
            verdict = "PASS" if diff <= 0 else ("FAIL (within 2 SE)" if diff <= 2 * se else "FAIL")
            summary_acc.append([schedule, d, nfe, f"{bk['label']} ({bk['actual']})", f"{bk['sw']:.4f}",
                                f"{bf['label']} ({bf['actual']})", f"{bf['sw']:.4f}", f"{bk['sw'] / bf['sw']:.3f}",
                                f"{diff:+.4f}", f"{se:.4f}", f"{floor:.4f}", verdict])
        for r in rows:
            r.pop("x", None)

    h = ["schedule", "d", "NFE", "diffkit best (NFE)", "SW", "diffusers best (NFE)", "SW", "dk/df", "dk-df", "SE(dk-df)",
         "floor", "target"]
    log("\n== accuracy target: diffkit's best deterministic sampler at least as accurate as diffusers' best ==")
    log(fmt_table(h, summary_acc, ["<", ">", ">", "<", ">", "<", ">", ">", ">", ">", ">", "<"]))
    log("(SE: paired-bootstrap standard error of the SW difference; PASS means dk-df <= 0)")
    md += ["## Accuracy target", "", "diffkit's best deterministic sampler vs diffusers' best deterministic "
           "scheduler (SW, lower is better; SE is the paired-bootstrap standard error of the difference):", "",
           md_table(h, summary_acc), ""]

    log(f"(accuracy part: {time.perf_counter() - t_start:.0f} s)")

    log(f"\n== narrow component: sampled std / true std ({NARROW_STD}) ==")
    nrows = narrow(2000 if quick else 4000, quick, log)
    hn, tn = method_table(nrows, "narrow")
    note_n = (f"two-component mixture in d = 8 on the linear schedule: std 0.3 at -1.5 e1 and std {NARROW_STD} at "
              "+1.5 e1; ratio of the sampled narrow component's std (directions orthogonal to e1) to the true "
              "one, 1 is exact; * marks a diffkit sampler's default spacing")
    log("(" + note_n + ")")
    log(fmt_table(hn, tn, ["<", "<", "<"] + [">"] * (len(hn) - 3)))
    md += ["## Narrow component", "", note_n.capitalize() + ":", "", md_table(hn, tn), ""]
    t_ov = time.perf_counter()
    log("\n== sampler overhead (zero denoiser, batch 16 x 16, default settings of each side) ==")
    ov_rows = []
    for nfe in ((20,) if quick else (10, 20, 100)):
        t_model, res = overhead(nfe, repeats)
        for r in res:
            paired = r["df"] != "UniPCMultistepScheduler"
            ov_rows.append([r["nfe"], r["dk"], f"{r['us_dk']:.1f}", f"{r['grid_dk']:.1f}",
                            r["df"].replace("Scheduler", ""), r["nfe_df"], f"{r['us_df']:.1f}",
                            f"{r['grid_df']:.1f}", f"{r['ratio']:.2f}",
                            ("PASS" if r["ratio"] <= 0.5 else "FAIL") if paired else "(info)"])
    h = ["NFE", "diffkit", "us/NFE", "grid", "diffusers", "its NFE", "us/NFE", "grid", "dk/df", "target <= 0.5"]
    note = (f"median of {repeats} complete sampling loops, both sides timed interleaved; zero-model time "
            f"({t_model:.2f} us/call) subtracted; "
            "'grid' is the part of us/NFE spent building the time grid (diffkit timesteps(), diffusers "
            "set_timesteps()); UniPC is set against dpmpp_2m for information (not a target pair)")
    log("(" + note + ")")
    log(fmt_table(h, ov_rows, [">", "<", ">", ">", "<", ">", ">", ">", ">", "<"]))
    md += ["## Sampler overhead", "", "Time outside the model per denoiser call, µs (" + note + "):", "",
           md_table(h, ov_rows), ""]

    log("\n== overhead through a real Denoiser (trivial ZeroNet backbone), batch 16 x 16, interleaved ==")
    dn_rows = []
    for nfe in ((20,) if quick else (10, 20, 100)):
        t_net, res = overhead_denoiser(nfe, repeats)
        for r in res:
            dn_rows.append([r["nfe"], r["dk"], f"{r['us_fast']:.1f}", f"{r['us_plain']:.1f}",
                            r["df"].replace("Scheduler", ""), f"{r['us_df']:.1f}", f"{r['ratio']:.2f}",
                            f"{r['ratio_plain']:.2f}", "yes" if r["same"] else "NO",
                            "PASS" if r["ratio"] <= 0.5 and r["same"] else "FAIL"])
    h = ["NFE", "diffkit", "us/NFE x0_at", "us/NFE plain call", "diffusers", "us/NFE", "dk/df",
         "dk/df plain", "bit-equal", "target <= 0.5"]
    note = (f"median of {repeats} complete sampling loops, the three timed interleaved; diffkit samples through "
            f"diffkit.Denoiser(ZeroNet, linear, 'eps') with its x0_at fast path and through the plain "
            f"denoiser(x, t) call; ZeroNet's own time ({t_net:.2f} us/call) subtracted from diffkit, the zero "
            "eps-model's from diffusers")
    log("(" + note + ")")
    log(fmt_table(h, dn_rows, [">", "<", ">", ">", "<", ">", ">", ">", "<", "<"]))
    md += ["## Overhead through a real Denoiser", "", "Time outside the network per call, µs (" + note + "):", "",
           md_table(h, dn_rows), ""]
    log(f"(overhead part: {time.perf_counter() - t_ov:.0f} s)")
    acc_pass = sum(r[-1] == "PASS" for r in summary_acc)
    ov_paired = [r for r in ov_rows if r[-1] != "(info)"]
    ov_pass = sum(r[-1] == "PASS" for r in ov_paired)
    dn_pass = sum(r[-1] == "PASS" for r in dn_rows)
    wall = time.perf_counter() - t_start
    summary = [f"accuracy target: {acc_pass}/{len(summary_acc)} (d, NFE) cases PASS -> "
               f"{'PASS' if acc_pass == len(summary_acc) else 'FAIL'}",
               f"overhead target: {ov_pass}/{len(ov_paired)} (NFE, sampler) pairs PASS -> "
               f"{'PASS' if ov_pass == len(ov_paired) else 'FAIL'}",
               f"overhead through a Denoiser: {dn_pass}/{len(dn_rows)} (NFE, sampler) pairs PASS -> "
               f"{'PASS' if dn_pass == len(dn_rows) else 'FAIL'}",
               f"wall time: {wall:.0f} s"]
    log("\n== summary ==")
    for line in summary:
        log(line)
    md += ["## Summary", ""] + [f"- {line}" for line in summary] + [""]
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(md))
        log(f"Markdown written to {args.markdown}")
    return 0


if __name__ == "__main__":
    main()
    sys.exit(0)
