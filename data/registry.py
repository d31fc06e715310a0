"""The one place that chooses a data source by ``--dataset``.

Every other module of the data layer knows only itself and what lies below it (data/__init__.py
draws the layers). Adding a source means adding its module, which defines ``SOURCE``, and one line
in :data:`SOURCES`.
"""
from __future__ import annotations

import numpy as np

from data import csv_source, nih, odir, synthetic
from data.base import DataError, DataSplits, Source

SOURCES: dict[str, Source] = {
    "synthetic": synthetic.SOURCE,
    "nih": nih.SOURCE,
    "odir": odir.SOURCE,
    "csv": csv_source.SOURCE,
}


def source_for(config) -> Source:
    if config.dataset not in SOURCES:
        raise DataError(f"unknown --dataset {config.dataset!r}; choose {', '.join(SOURCES)}")
    return SOURCES[config.dataset]


def class_names_for(config) -> list[str]:
    """The class list a config implies, without loading any images."""
    return source_for(config).class_names(config)


def build_datasets(config) -> DataSplits:
    """The train, validation and test splits (and any extra test sets) a config describes; real
    data is checked before anything is returned (data/preflight.py)."""
    return source_for(config).build(config)


def dataset_scores(config, split_name: str, disease_targets: np.ndarray, probabilities: np.ndarray) -> dict:
    """Metrics a source reports besides per-class AUC (the official ODIR score for ODIR), else none.

    disease_targets, probabilities: [N, C] (No Finding excluded), as ``Trainer.predict`` returns.
    """
    source = SOURCES.get(config.dataset)
    if source is None or source.scores is None or not len(disease_targets):
        return {}
    return source.scores(disease_targets, probabilities)
