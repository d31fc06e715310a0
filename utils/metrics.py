"""Evaluation metrics of METHOD.md: per-class ROC-AUC and the official ODIR score."""
from __future__ import annotations

import logging
import math

import numpy as np
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

logger = logging.getLogger(__name__)


def per_class_auc(disease_targets: np.ndarray, probabilities: np.ndarray, disease_names: list[str]) -> dict:
    """ROC-AUC per disease and their mean over the diseases that have both labels in the split.

    disease_targets, probabilities: [N, C]. A disease with only one label value has no AUC (NaN,
    written as null) and is left out of the mean, with a warning.
    """
    auc = {}
    for column, name in enumerate(disease_names):
        labels = disease_targets[:, column]
        if labels.min() == labels.max():
            logger.warning("AUC of %s undefined: only one label value in this split", name)
            auc[name] = float("nan")
        else:
            auc[name] = float(roc_auc_score(labels, probabilities[:, column]))
    defined = [value for value in auc.values() if not math.isnan(value)]
    mean = float(np.mean(defined)) if defined else float("nan")
    return dict(mean_auc=mean, auc=auc)


def odir_score(disease_targets: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> dict:
    """The ODIR challenge formula: kappa, micro F1 and AUC on the flattened arrays; final = mean."""
    flat_targets = disease_targets.reshape(-1).astype(int)
    flat_probabilities = probabilities.reshape(-1)
    predictions = (flat_probabilities > threshold).astype(int)
    kappa = float(cohen_kappa_score(flat_targets, predictions))
    f1 = float(f1_score(flat_targets, predictions, average="micro"))
    auc = float(roc_auc_score(flat_targets, flat_probabilities)) if flat_targets.min() != flat_targets.max() else float("nan")
    return dict(kappa=kappa, f1=f1, auc=auc, final=(kappa + f1 + auc) / 3)


def json_safe(value):
    """NaN -> None, recursively, so results.json is strict JSON."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
