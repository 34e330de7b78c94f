"""Independent references for the engine tests (issue 16: shared by test_schedules, test_process,
test_analytic and test_denoiser rather than copied): numpy cumprods and Nichol's cosine formula,
computed without diffkit."""
from __future__ import annotations

import numpy as np
import torch

#: the dtype the engine tests compute and compare in
F64 = torch.float64


def ref_linear_alpha_bar(T=1000, b0=1e-4, b1=0.02):
    """alpha_bar_n, n = 1..T, of Ho et al.'s linear schedule (numpy, independent of torch)."""
    return np.cumprod(1.0 - np.linspace(b0, b1, T))


def ref_cosine_alpha_bar(t, s=0.008):
    """Nichol & Dhariwal (2021), eq. 17: alpha_bar = f(t)/f(0), f = cos^2(((t+s)/(1+s)) pi/2)."""
    t = np.asarray(t, dtype=np.float64)
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    return f(t) / f(0.0)
