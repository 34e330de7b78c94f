"""Exact denoisers of Gaussian and Gaussian-mixture data, for testing and benchmarking samplers.

For data ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` and ``x_t = alpha x0 + sigma eps``, the marginal
of ``x_t`` is ``sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I)`` and

    E[x0 | x_t] = sum_k r_k(x_t) [ mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x_t - alpha mu_k) ]

with ``r_k`` the posterior responsibilities.  One component is the Gaussian case, whose
denoiser is linear in ``x_t``.  These objects follow the sampler contract: ``D(x, t) -> x0``
and a ``schedule`` attribute.  Shapes: ``mu_k`` broadcasts against one sample ``x[0]``.
"""
from __future__ import annotations


import torch

from ._shape import as_batch_time, bcast


class GaussianMixtureDenoiser:
    """Exact ``E[x0 | x_t]`` for isotropic Gaussian-mixture data."""

    def __init__(self, schedule, means, stds, weights=None):
        self.schedule = schedule
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, *shape broadcastable to a sample)
        if self.means.ndim < 1:
            raise ValueError("means must have a leading component axis: shape (K, ...)")
        K = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(K).clone()
        w = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.log_w = (w / w.sum()).log()
        self.nfe = 0  # number of calls, for benchmarks

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        self.nfe += 1
        B = x.shape[0]
        t = as_batch_time(t, B, device=x.device)
        a, s = self.schedule.coeffs(t)  # (B,)
        xd = x.to(torch.float64)
        K = self.means.shape[0]
        try:
            mu = torch.broadcast_to(self.means.to(x.device), (K, *x.shape[1:]))
        except RuntimeError:
            raise ValueError(f"mixture means of shape {tuple(self.means.shape[1:])} do not broadcast "
                             f"against a sample of shape {tuple(x.shape[1:])}") from None
        d = xd[0].numel()
        flat = xd.reshape(B, -1)  # (B, d) -- rank-agnostic flattening of each sample
        muf = mu.reshape(K, -1)  # (K, d)
        var = a[:, None] ** 2 * self.stds.to(x.device)[None] ** 2 + s[:, None] ** 2  # (B, K)
        diff = flat[:, None, :] - a[:, None, None] * muf[None]  # (B, K, d)
        logp = self.log_w.to(x.device)[None] - 0.5 * (diff**2).sum(-1) / var - 0.5 * d * var.log()
        r = torch.softmax(logp, dim=1)  # (B, K)
        gain = a[:, None] * self.stds.to(x.device)[None] ** 2 / var  # (B, K)
        post = muf[None] + gain[..., None] * diff  # (B, K, d)
        x0 = (r[..., None] * post).sum(1)
        return x0.reshape(x.shape).to(x.dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None, sample_shape=None) -> torch.Tensor:
        """Exact samples of the data distribution, shape ``(n, *sample_shape)``.

        ``sample_shape`` defaults to the shape of the means; give it when the means broadcast."""
        shape = tuple(self.means.shape[1:]) if sample_shape is None else tuple(sample_shape)
        mu = torch.broadcast_to(self.means, (self.means.shape[0], *shape))
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn((n, *shape), generator=generator, dtype=torch.float64)
        return mu[k] + bcast(self.stds[k], z) * z


class GaussianDenoiser(GaussianMixtureDenoiser):
    """Exact denoiser of ``x0 ~ N(mean, std^2 I)``: linear, ``mean + alpha std^2/(alpha^2 std^2 + sigma^2) (x - alpha mean)``."""

    def __init__(self, schedule, mean, std):
        super().__init__(schedule, torch.as_tensor(mean, dtype=torch.float64)[None], [float(std)])
