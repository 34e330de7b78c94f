"""Scoring class-conditional samples with a classifier fitted on the real images.

:func:`pixel_classifier` fits a logistic regression on the raw pixel values of an
:class:`~diffkit_images.ImageAdapter`'s training split (for the 8x8 digits it reads the held-out
real digits at about 96 %); :func:`class_agreement` is the fraction of samples it puts in the
class they were drawn for -- about 1/K when the model ignores the label.  scikit-learn is
imported lazily.
"""
from __future__ import annotations

import os

import numpy as np
import torch

__all__ = ["pixel_classifier", "class_agreement"]


def pixel_classifier(adapter, *, C: float = 0.1):
    """``(classifier, accuracy)``: logistic regression on the raw pixels of ``adapter``'s training
    split, and its accuracy on the validation split (the reference for :func:`class_agreement`)."""
    from sklearn.linear_model import LogisticRegression

    if adapter.labels is None:
        raise ValueError("the data set has no class labels; a classifier needs a class-conditional source")

    def xy(idx):
        idx = torch.as_tensor(idx)
        return adapter.data[idx].reshape(len(idx), -1).float().numpy(), adapter.labels[idx].numpy()

    clf = LogisticRegression(max_iter=2000, C=C).fit(*xy(adapter.train_idx))
    xv, yv = xy(adapter.val_idx)
    return clf, float((clf.predict(xv) == yv).mean()) if len(yv) else float("nan")


def class_agreement(clf, samples: str | os.PathLike, value_range: tuple[float, float]) -> float:
    """Fraction of the samples in ``samples`` (the ``.npz`` that ``decode`` writes beside the PNG)
    that ``clf`` classifies as their label; values are clipped to ``value_range`` (the data's
    range, e.g. 0..16 for the digits) as a displayed image would be."""
    z = np.load(samples, allow_pickle=False)
    if "labels" not in z:
        raise ValueError(f"{samples} holds no labels; sample a class-conditional model")
    x = np.clip(z["x"], *value_range).reshape(len(z["labels"]), -1)
    return float((clf.predict(x) == z["labels"]).mean())
