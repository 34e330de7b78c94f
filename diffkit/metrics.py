"""Domain-agnostic sample-quality metrics; the ensemble scores are in :mod:`diffkit.ensemble`."""
from __future__ import annotations

import torch

from .ensemble import METRICS as ENSEMBLE_METRICS
from .hookspecs import hookimpl


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_projections: int = 256,
                       generator: torch.Generator | None = None, p: int = 2) -> torch.Tensor:
    """Sliced p-Wasserstein distance between two sample sets (Rabin et al. 2011).

    ``x`` and ``y`` are ``(N, *shape)`` and ``(M, *shape)``; samples are flattened, projected on
    ``n_projections`` random unit directions, and the 1-D distances between the sorted
    projections (matched by quantiles when N != M) are averaged: ``(mean_theta W_p^p)^(1/p)``.
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(torch.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sample sizes differ: {x.shape[1]} vs {y.shape[1]} values per sample")
    theta = torch.randn(x.shape[1], n_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    theta = theta.to(x.device)
    px = (theta.T @ x.T).sort(dim=-1).values  # (P, N): sort contiguous rows
    py = (theta.T @ y.T).sort(dim=-1).values
    if px.shape[1] != py.shape[1]:
        q = torch.linspace(0, 1, max(px.shape[1], py.shape[1]), dtype=torch.float64, device=x.device)
        px = torch.quantile(px, q, dim=-1)
        py = torch.quantile(py, q, dim=-1)
    return ((px - py).abs() ** p).mean() ** (1.0 / p)


def mean_std_error(x: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest absolute errors of the per-element sample mean and std against targets."""
    m = x.mean(0)
    s = x.std(0)
    return (m - torch.as_tensor(mean, dtype=x.dtype)).abs().max(), (s - torch.as_tensor(std, dtype=x.dtype)).abs().max()


BUILTIN_METRICS = {"sliced_wasserstein": sliced_wasserstein, **ENSEMBLE_METRICS}
"""diffkit's own metrics, registered through the ``diffkit_metrics`` hook below (a built-in plugin,
:mod:`diffkit._builtins`)."""


@hookimpl
def diffkit_metrics():
    """diffkit's own metrics (:data:`BUILTIN_METRICS`)."""
    return dict(BUILTIN_METRICS)
