"""``diffkit evaluate`` of PDE rollouts and analyses: the core's generic ensemble scoring
(:class:`diffkit.evaluation.EnsembleEvaluator`) with the PDE domain's one convention added -- a
trajectories file holds many trajectories, and a rollout or analysis records the position of the one
it started from (``init_index``, as ``--index`` counts), so that is the truth's slice unless
``--select trajectory=VALUE`` says otherwise; a file whose times are per trajectory (a variable
``t (trajectory, time)``) is matched on that trajectory's times."""
from __future__ import annotations

import numpy as np

from diffkit.evaluation import EnsembleEvaluator, EvaluationError, select_index, select_truth

__all__ = ["PDEEvaluator"]

#: what diffkit's PDE commands write as the ``source`` of a rollout or an analysis
SOURCES = ("diffkit rollout", "diffkit assimilate")


class PDEEvaluator(EnsembleEvaluator):
    """PDE rollouts and analyses (dims member, time, x...): scored per time against the trajectory of the
    trajectories file they started from."""

    name = "pde"

    @classmethod
    def can_evaluate(cls, ds) -> bool:
        return (ds.attrs.get("source") in SOURCES and "member" in ds.dims and "time" in ds.dims
                and "lead_time" not in ds.dims)

    @classmethod
    def truth(cls, forecast, truth, args):
        sel = cls.select(forecast, truth, args)
        if "trajectory" in truth.dims:
            n = truth.sizes["trajectory"]
            if "trajectory" in sel:          # the user's choice, by value as --select reads it: its position
                i = select_index(truth, "trajectory", sel.pop("trajectory"))
            elif "init_index" in forecast.attrs:
                i = int(forecast.attrs["init_index"])
                if not 0 <= i < n:
                    raise EvaluationError(f"the forecast started from trajectory {i} (init_index) and the truth has "
                                          f"{n} (0..{n - 1}): give the file it started from, or --select "
                                          f"trajectory=VALUE")
            else:
                raise EvaluationError("the truth holds several trajectories and the forecast does not record the one "
                                      "it started from (init_index): choose one with --select trajectory=VALUE")
            if "t" in truth.data_vars and truth["t"].dims == ("trajectory", "time"):
                truth = truth.assign_coords(time=("time", np.asarray(truth["t"].values[i]), truth["time"].attrs))
            truth = truth.isel(trajectory=i, drop=True)
        return select_truth(truth, sel)
