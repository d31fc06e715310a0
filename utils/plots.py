"""The plots people expect in a run directory: roc.png (test split) and training_curves.png (metrics.csv).

Drawn on matplotlib ``Figure`` objects with the Agg canvas (no pyplot, no display, no global state).
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from losses import LOSS_TERMS

logger = logging.getLogger(__name__)


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def write_roc(path: Path, disease_targets: np.ndarray, probabilities: np.ndarray, disease_names: list[str],
              title: str = "ROC on the test split") -> bool:
    """One ROC curve per disease, AUC in the legend; diseases with a single label value are listed as
    undefined. Returns False (and writes nothing) when no disease has both labels."""
    figure = _figure(7.5, 6.5)
    axis = figure.add_subplot(1, 1, 1)
    drawn, aucs = 0, []
    for column, name in enumerate(disease_names):
        labels = disease_targets[:, column]
        if labels.min() == labels.max():
            axis.plot([], [], " ", label=f"{name}: undefined (one label value)")
            continue
        false_positive, true_positive, _ = roc_curve(labels, probabilities[:, column])
        auc = float(roc_auc_score(labels, probabilities[:, column]))
        aucs.append(auc)
        axis.plot(false_positive, true_positive, linewidth=1.6, label=f"{name}: AUC {auc:.3f}")
        drawn += 1
    if not drawn:
        logger.warning("no ROC curve to draw: every disease has a single label value in this split")
        return False
    axis.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=0.8)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.01)
    axis.set_xlabel("false positive rate (1 - specificity)")
    axis.set_ylabel("true positive rate (sensitivity)")
    axis.set_title(f"{title}  (mean AUC {np.mean(aucs):.3f}, {len(disease_targets)} images)", fontsize=11)
    axis.legend(loc="lower right", fontsize=8, frameon=True)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return True


def _read_metrics(metrics_csv: Path) -> list[dict]:
    with Path(metrics_csv).open(newline="") as stream:
        return list(csv.DictReader(stream))


def _value(row: dict, key: str) -> float:
    try:
        return float(row.get(key, "") or "nan")
    except ValueError:
        return math.nan


def write_training_curves(path: Path, metrics_csv: Path) -> bool:
    """Loss terms and validation mean AUC per schedule stage, push stages marked; one small panel per
    quantity, since the terms live on different scales. Returns False when metrics.csv is missing or empty."""
    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        logger.warning("no %s: training_curves.png not written", metrics_csv)
        return False
    rows = _read_metrics(metrics_csv)
    if not rows:
        logger.warning("%s has no rows: training_curves.png not written", metrics_csv)
        return False
    steps = np.array([_value(row, "stage_index") for row in rows])
    quantities = [name for name in ("loss", *LOSS_TERMS, "val_mean_auc")
                  if any(math.isfinite(_value(row, name)) for row in rows)]
    columns = 3
    panel_rows = max(1, math.ceil(len(quantities) / columns))
    figure = _figure(4.2 * columns, 3.0 * panel_rows + 0.6)
    figure.suptitle(f"Training curves ({metrics_csv.parent.name or metrics_csv.parent}): per schedule stage; "
                    "dotted lines = push", fontsize=12)
    pushes = [_value(row, "stage_index") for row in rows if row.get("stage") == "push"]
    kinds = {"warmup": "tab:blue", "paired": "tab:orange", "push": "tab:red", "last_layer": "tab:green"}
    for slot, name in enumerate(quantities):
        axis = figure.add_subplot(panel_rows, columns, slot + 1)
        values = np.array([_value(row, name) for row in rows])
        finite = np.isfinite(values)
        axis.plot(steps[finite], values[finite], color="black", linewidth=1.0, alpha=0.6)
        for kind, colour in kinds.items():
            member = finite & np.array([row.get("stage") == kind for row in rows])
            if member.any():
                axis.scatter(steps[member], values[member], s=14, color=colour, label=kind.replace("_", " "), zorder=3)
        for push in pushes:
            axis.axvline(push, color="tab:red", linestyle=":", linewidth=1.0)
        axis.set_title("validation mean AUC" if name == "val_mean_auc" else f"{name.replace('_', ' ')} loss"
                       if name != "loss" else "total loss", fontsize=10)
        axis.set_xlabel("schedule stage", fontsize=8)
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
        if slot == 0:
            axis.legend(fontsize=7, loc="best")
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.6 / (3.0 * panel_rows + 0.6)))
    figure.savefig(path)
    return True


def write_report_plots(probabilities, disease_targets, disease_names, run_dir: Path, metrics_csv: Path) -> None:
    """roc.png from the test split's disease probabilities and targets ([N, C] each) and
    training_curves.png from ``metrics_csv``, both into ``run_dir``; a missing metrics.csv or a
    one-label split only skips its plot (with a warning)."""
    run_dir = Path(run_dir)
    if write_roc(run_dir / "roc.png", disease_targets, probabilities, list(disease_names)):
        logger.info("wrote %s", run_dir / "roc.png")
    if write_training_curves(run_dir / "training_curves.png", metrics_csv):
        logger.info("wrote %s", run_dir / "training_curves.png")
