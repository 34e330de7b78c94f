"""ETDRK4: fourth-order exponential time differencing Runge--Kutta for ``v_t = L v + N(v)``.

The scheme of Cox & Matthews (2002, J. Comput. Phys. 176, 430) for a *diagonal* linear operator
``L`` (e.g. in a spectral basis), in the form of Kassam & Trefethen (2005, SIAM J. Sci. Comput.
26, 1214): the linear part is integrated exactly, the nonlinear part ``N`` explicitly with four
evaluations per step, and the phi functions are evaluated by a contour integral (a mean over
``n_contour`` points of a unit circle around each ``h*lambda``), which avoids the cancellation of
the explicit formulas for small ``|h*lambda|``.

- :func:`etdrk4_coefficients`: the coefficients ``E, E2, Q, f1, f2, f3`` (float64);
- :class:`ETDRK4`: one step ``v -> v(t + h)``, coefficients moved once to the state's device and
  real dtype (float32 or float64; the state itself may be complex);
- :func:`amplification_factor`: the one-step amplification factor for the scalar test equation
  ``v' = lambda v + mu v`` (``lambda`` exact, ``mu`` explicit), for linear stability analyses;
- :func:`resolve_device_dtype`: the device and real dtype of a state (those of a reference
  tensor unless given; else CPU/float64).

Pure torch; importing :mod:`diffkit` does not import this module (the simulators that use it do).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

__all__ = ["SCHEME", "etdrk4_coefficients", "ETDRK4", "amplification_factor", "resolve_device_dtype"]

SCHEME = "ETDRK4 (Cox & Matthews 2002; Kassam & Trefethen 2005 contour-integral phi functions)"


def resolve_device_dtype(device, dtype, ref=None) -> tuple[torch.device, torch.dtype]:
    """The device and real dtype of a state: those given, else those of ``ref`` (a tensor, e.g. an
    initial condition; its dtype only if floating point), else CPU and float64.  The dtype must
    be float32 or float64 (the state may then be complex64 or complex128)."""
    if device is None:
        device = ref.device if isinstance(ref, torch.Tensor) else "cpu"
    if dtype is None:
        dtype = ref.dtype if isinstance(ref, torch.Tensor) and ref.is_floating_point() else torch.float64
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return torch.device(device), dtype


def etdrk4_coefficients(lin, h, n_contour: int = 32) -> dict[str, torch.Tensor]:
    """ETDRK4 coefficients ``E, E2, Q, f1, f2, f3`` for a real diagonal linear operator ``lin``.

    ``lin`` and the step ``h`` (a number or a tensor, e.g. one step per batch row) broadcast
    together.  With ``z = h*lin``: ``E = e^z``, ``E2 = e^{z/2}``, and ``Q``, ``f1``, ``f2``, ``f3``
    are ``h`` times the phi-function combinations of Kassam & Trefethen (2005, eq. 2.5), each
    evaluated as the mean over ``n_contour`` points on the upper half of a unit circle centred on
    ``z`` (their ``kursiv.m``; the real part, since ``z`` is real).  Computed in float64 on the
    device of ``lin``; returned as float64 tensors of the broadcast shape.
    """
    lin = torch.as_tensor(lin, dtype=torch.float64)
    h = torch.as_tensor(h, dtype=torch.float64)
    hl = h * lin
    r = torch.exp(1j * math.pi * (torch.arange(1, n_contour + 1, dtype=torch.float64) - 0.5) / n_contour)
    LR = hl.to(torch.complex128)[..., None] + r.to(hl.device)
    eLR = torch.exp(LR)
    Q = h * ((torch.exp(LR / 2) - 1) / LR).mean(-1).real
    f1 = h * ((-4 - LR + eLR * (4 - 3 * LR + LR ** 2)) / LR ** 3).mean(-1).real
    f2 = h * ((2 + LR + eLR * (-2 + LR)) / LR ** 3).mean(-1).real
    f3 = h * ((-4 - 3 * LR - LR ** 2 + eLR * (4 - LR)) / LR ** 3).mean(-1).real
    return {"E": torch.exp(hl), "E2": torch.exp(hl / 2), "Q": Q, "f1": f1, "f2": f2, "f3": f3}


class ETDRK4:
    """One ETDRK4 step ``v -> v(t+h)`` for ``v_t = lin*v + N(v)`` with diagonal real ``lin``.

    The coefficients are computed once in float64 (:func:`etdrk4_coefficients`) and moved to
    ``device`` in the real ``dtype`` of the state (float32 for complex64 states, float64 for
    complex128), so the time loop does no host transfers.  ``lin`` and ``h`` broadcast against
    the state (a per-row step: ``h`` of shape (B, 1) with ``lin`` of shape (B, K)).
    """

    def __init__(self, lin, h, device=None, dtype=torch.float64, n_contour: int = 32):
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"ETDRK4: dtype must be torch.float32 or torch.float64 (the real dtype of the "
                            f"state), got {dtype}")
        for name, t in etdrk4_coefficients(lin, h, n_contour).items():
            setattr(self, name, t.to(device=device, dtype=dtype))

    def step(self, v: torch.Tensor, N: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``v(t+h)`` from ``v(t)``; ``N`` is the nonlinear (explicit) part, evaluated four times."""
        Nv = N(v)
        a = self.E2 * v + self.Q * Nv
        Na = N(a)
        b = self.E2 * v + self.Q * Na
        Nb = N(b)
        c = self.E2 * a + self.Q * (2 * Nb - Nv)
        Nc = N(c)
        return self.E * v + Nv * self.f1 + 2 * (Na + Nb) * self.f2 + Nc * self.f3


def frames(stepper, v: torch.Tensor, N: Callable[[torch.Tensor], torch.Tensor], n_sub: int, n_frames: int,
           bar=None) -> Iterator[tuple[int, torch.Tensor]]:
    """The output frames ``(j, v_j)``, ``j = 0 .. n_frames - 1``, of a run from ``v`` with ``stepper``
    (an :class:`ETDRK4`): ``v_0 = v``, each later frame ``n_sub`` steps after the one before; ``bar``
    (a progress bar) advances one a frame.  The simulators' time loop."""
    for j in range(n_frames):
        if j > 0:
            for _ in range(n_sub):
                v = stepper.step(v, N)
            if bar is not None:
                bar.update(1)
        yield j, v


def amplification_factor(z, w, n_contour: int = 32) -> torch.Tensor:
    """One-step amplification factor ``R(z, w)`` of ETDRK4 for ``v' = lambda v + mu v``.

    ``z = h lambda`` (real: the part integrated exactly) and ``w = h mu`` (complex: the part
    treated explicitly) broadcast; ``v(t+h) = R v(t)`` elementwise.  The scheme is linearly
    stable for the pair when ``|R| <= max(1, e^z)``.
    """
    c = etdrk4_coefficients(z, 1.0, n_contour)
    E, E2, Q, f1, f2, f3 = (c[k] for k in ("E", "E2", "Q", "f1", "f2", "f3"))
    a = E2 + Q * w
    b = E2 + Q * w * a
    cc = E2 * a + Q * w * (2 * b - 1)
    return E + f1 * w + 2 * f2 * w * (a + b) + f3 * w * cc
