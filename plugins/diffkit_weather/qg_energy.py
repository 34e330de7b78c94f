"""Energy budget of the two-layer QG model: total energy, its kinetic and potential parts and the
tendency term by term (conversion from the mean shear, drag, filter, Jacobian) of saved states,
exact for the discrete model, checked against finite differences of the energy over the frames.
"""
from __future__ import annotations

import torch

from .qg_model import _Spectral


def energy_budget(result: dict, *, fd_order: int = 4) -> dict:
    """Energy budget of saved QG states (per member and frame), exact for the discrete model.

    Needs ``result["q"]`` (all frames) and ``result["params"]`` from
    :func:`~diffkit_weather.qg.simulate_qg`.

    Total (KE + APE) energy per unit mass, domain mean, m^2 s^-2::

        E = (H1 |grad psi1|^2/2 + H2 |grad psi2|^2/2 + H1 F1 (psi1 - psi2)^2/2) / H,

    whose tendency is ``dE/dt = -(1/H) sum_n H_n <psi_n d_t q_n>``.  Term by term (W/kg):
    ``conversion`` (the background-flow terms ``-U_n q_x - Qy_n psi_x``, i.e. baroclinic
    conversion from the mean shear, ``(H1 F1 / H)(U1 - U2) <psi1 d_x psi2>``; the beta parts
    contribute nothing), ``drag`` (``-(H2/H) rek <|grad psi2|^2>``), ``filter`` (the spectral
    filter's loss) and ``nonlinear`` (the Jacobian's: zero to round-off, the dealiased Jacobian
    conserves energy).  ``tendency`` is their sum; ``tendency_fd`` is ``dE/dt`` from centred
    finite differences of ``energy`` over the frames (order ``fd_order`` = 2 or 4; NaN at the
    first and last ``fd_order/2`` frames) and ``residual = tendency_fd - tendency``.
    Returns float64 tensors of shape (n_members, n_steps), also ``kinetic_energy`` and
    ``potential_energy``.
    """
    p = result["params"]
    if p.get("nx_sim", p["nx"]) != p["nx"]:
        raise ValueError(f"energy_budget needs the model's own state, but this result is coarse-grained "
                         f"({p['nx_sim']}^2 model observed on {p['nx']}^2); run simulate_qg without observe")
    q = torch.as_tensor(result["q"]).to(torch.float64)
    S = _Spectral(p, q.device, torch.float64)
    qh = S.fft(q)
    ph = S.psi(qh)
    w = S.weights.to(q.device)
    H, H1, H2, F1 = p["H"], p["H1"], p["H2"], p["F1"]
    Hn = torch.tensor([H1, H2], dtype=torch.float64, device=q.device)[:, None, None]

    def mean_prod(a, b):               # <a b> summed with H_n / H weights over the layers
        return (w * (a.conj() * b).real * Hn / H).sum((-3, -2, -1))

    K2 = S.K2_64.to(q.device)
    ke = 0.5 * mean_prod(ph, K2 * ph)
    d = ph[..., 0, :, :] - ph[..., 1, :, :]
    ape = 0.5 * H1 * F1 / H * (w * d.abs() ** 2).sum((-2, -1))
    dev = lambda t: t.to(q.device)
    conversion = -mean_prod(ph, dev(S.Lq64) * qh + dev(S.Lbg64) * ph)
    drag = -mean_prod(ph, dev(S.drag64) * ph)
    filt = -mean_prod(ph, -dev(S.sigma64) * qh)
    nonlin = -mean_prod(ph, -S.jacobian(qh, ph))
    E = ke + ape
    tend = conversion + drag + filt + nonlin
    tau = float(p["out_every"])
    fd = torch.full_like(E, float("nan"))
    if fd_order == 2 and E.shape[-1] >= 3:
        fd[..., 1:-1] = (E[..., 2:] - E[..., :-2]) / (2 * tau)
    elif fd_order == 4 and E.shape[-1] >= 5:
        fd[..., 2:-2] = (-E[..., 4:] + 8 * E[..., 3:-1] - 8 * E[..., 1:-3] + E[..., :-4]) / (12 * tau)
    elif fd_order not in (2, 4):
        raise ValueError(f"fd_order must be 2 or 4, got {fd_order}")
    return {"energy": E, "kinetic_energy": ke, "potential_energy": ape, "conversion": conversion,
            "drag": drag, "filter": filt, "nonlinear": nonlin, "tendency": tend,
            "tendency_fd": fd, "residual": fd - tend}
