"""External validation: a trained checkpoint on someone else's CSV-described images.

    python main.py --eval-only --checkpoint CKPT --test-csv NEW.csv --image-root DIR [--boxes B.csv] --out-dir OUT

Only the external set is read (never the checkpoint's training data, which the user may not have).
It is read by the project's own CSV reader (``data.csv_source.load_csv``: one 0/1 column per class or
one ``|``-separated label column, uncertain labels, one row per reader merged, DICOM), then its
classes are matched by name to the model's:

* ``--label-map OLD=NEW,...`` renames the set's labels first;
* names match ignoring case and ``_`` versus space (``Pleural_Thickening`` = ``pleural thickening``);
* a label the model has no class for stops the evaluation, unless ``--ignore-unknown-labels``;
* a disease of the model that the set does not have is listed and left out of the mean AUC.

The result folder holds ``results.json`` (AUC per class and their mean, the missing diseases, the
ignored labels, localisation when ``--boxes`` is given), ``predictions.csv`` (image, one probability
per disease of the model, the image's labels) and ``roc.png``.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data import preflight
from data.base import NO_FINDING, DataError
from data.csv_source import load_csv
from data.pools import FileImageDataset, attach_boxes, probe_channels
from data.tables import read_box_file
from utils.metrics import per_class_auc

logger = logging.getLogger(__name__)

# Config fields that describe the external set; with --eval-only --test-csv they come from the
# command line only (a checkpoint trained on a CSV set must not impose its own columns on the new one).
EXTERNAL_FIELDS = frozenset({
    "test_csv", "image_column", "label_column", "patient_column", "classes", "uncertain_label", "boxes",
})


def parse_label_map(text: str) -> dict[str, str]:
    """'Infiltrate=Infiltration,Pleural Effusion=Effusion' -> {old: new}."""
    mapping: dict[str, str] = {}
    for part in (piece.strip() for piece in text.split(",")):
        if not part:
            continue
        old, sign, new = part.partition("=")
        old, new = old.strip(), new.strip()
        if not sign or not old or not new:
            raise ValueError(f"--label-map: {part!r} is not OLD=NEW (write e.g. --label-map 'Infiltrate=Infiltration,Pleural Effusion=Effusion')")
        if old in mapping and mapping[old] != new:
            raise ValueError(f"--label-map renames {old!r} twice ({mapping[old]!r} and {new!r})")
        mapping[old] = new
    return mapping


def name_key(name: str) -> str:
    """The form class names are matched in: case, '_' versus space and repeated spaces do not matter."""
    return " ".join(name.replace("_", " ").casefold().split())


def external_config(config, command_line: dict):
    """The checkpoint's configuration with the external set described by this command line only:
    the set-describing fields, --image-root and --data-root are taken from ``command_line`` (the
    Config fields given there) or reset to their defaults; the image cache is not used (one pass)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    values = {name: command_line.get(name, defaults[name]) for name in EXTERNAL_FIELDS | {"image_root", "data_root"}}
    return dataclasses.replace(config, **values, cache=False)


@dataclass
class ExternalSet:
    """The external set in the model's class space."""

    dataset: FileImageDataset  # targets [N, K] over the model's classes, No Finding derived
    source: Path
    evaluated: list[str]  # model diseases the set has, in the model's order
    missing: list[str]  # model diseases the set lacks (no AUC, left out of the mean)
    ignored: dict[str, int] = field(default_factory=dict)  # set label -> images, with --ignore-unknown-labels
    label_map: dict[str, str] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)  # per image, the set's own labels (after --label-map), '|'-joined

    @property
    def evaluated_columns(self) -> list[int]:
        names = self.dataset.class_names
        return [names.index(name) for name in self.evaluated]


def _channels(config, pool: FileImageDataset) -> int:
    """As the model was trained: ODIR in colour, NIH and the synthetic data grey; a model trained on
    a CSV set takes colour if the new images are colour (grey X-rays stored as RGB stay grey)."""
    if config.dataset == "odir":
        return 3
    if config.dataset != "csv" or not len(pool):
        return 1
    return probe_channels(pool)


def build_external_set(config, class_names: list[str], label_map: dict[str, str] | None = None,
                       ignore_unknown: bool = False) -> ExternalSet:
    """Read, check and map the set ``config.test_csv`` describes onto ``class_names`` (the model's,
    No Finding last). Raises DataError naming the file for anything unusable."""
    label_map = dict(label_map or {})
    path = Path(config.test_csv).expanduser()
    # load_csv reads a training list (whose header defines the classes), a validation list and a
    # test list; the external set is all three, so nothing is carved from it. Boxes are attached
    # below, to the one pool used.
    plan = load_csv(dataclasses.replace(config, dataset="csv", train_csv=str(path), val_csv=str(path),
                                                test_csv=str(path), boxes=""))
    pool = plan.pools["test"]
    if not len(pool):
        raise DataError(f"{path} lists no images")
    set_names = list(pool.class_names[:-1])
    stray = [old for old in label_map if old not in set_names]
    if stray:
        raise DataError(f"--label-map renames {', '.join(repr(s) for s in stray)}, which {path} does not have "
                        f"(its labels: {', '.join(set_names) or 'none'})")
    if config.boxes:
        # A box may name its disease as the CSV does or as --label-map renames it.
        renamed_back = {new: old for old, new in label_map.items()}
        boxes = read_box_file(Path(config.boxes).expanduser(), pool.class_names, extra_aliases=renamed_back)
        attached = attach_boxes(pool, boxes)
        logger.info("%d boxes on %d images from %s", attached, len(pool.boxes), config.boxes)
    renamed = [label_map.get(name, name) for name in set_names]
    diseases = class_names[:-1]
    model_column = {name_key(name): column for column, name in enumerate(diseases)}
    target_of = [model_column.get(name_key(name)) for name in renamed]  # set column -> model column or None

    counts = pool.targets[:, :-1].sum(axis=0).astype(int)
    unknown = {name: int(counts[s]) for s, name in enumerate(renamed) if target_of[s] is None}
    if unknown and not ignore_unknown:
        listed = ", ".join(f"{name!r} ({count} images)" for name, count in unknown.items())
        raise DataError(f"{path}: labels the model has no class for: {listed}; the model knows "
                        f"{', '.join(diseases)}. Rename them with --label-map OLD=NEW or leave them out with "
                        f"--ignore-unknown-labels")
    if unknown:
        logger.warning("%s: left out labels the model has no class for: %s", path.name,
                       ", ".join(f"{name} ({count} images)" for name, count in unknown.items()))

    targets = np.zeros((len(pool), len(class_names)), dtype=np.float32)
    for s, column in enumerate(target_of):
        if column is not None:  # several set labels may map to one class: a disease if any says so
            targets[:, column] = np.maximum(targets[:, column], pool.targets[:, s])
    targets[:, -1] = targets[:, :-1].sum(axis=1) == 0
    covered = sorted({column for column in target_of if column is not None})
    evaluated = [diseases[column] for column in covered]
    missing = [name for column, name in enumerate(diseases) if column not in covered]
    if not evaluated:
        raise DataError(f"{path} shares no disease with the model ({', '.join(diseases)}); rename its labels "
                        f"with --label-map OLD=NEW")
    if missing:
        logger.warning("%s has no labels for %s: no AUC for them, left out of the mean", path.name, ", ".join(missing))

    boxes, dropped = {}, 0
    for index, image_boxes in pool.boxes.items():
        kept = [(target_of[c], x, y, w, h) for c, x, y, w, h in image_boxes if target_of[c] is not None]
        dropped += len(image_boxes) - len(kept)
        if kept:
            boxes[index] = kept
    if dropped:
        logger.warning("%s: %d boxes of labels the model has no class for were left out", config.boxes, dropped)

    dataset = FileImageDataset(
        name=pool.name, source=str(path), image_paths=pool.image_paths, image_ids=pool.image_ids, targets=targets,
        class_names=class_names, channels=_channels(config, pool), boxes=boxes,
    )
    preflight.stat_images(dataset.image_paths, str(path))
    if config.verify_images:
        preflight.check_decodable(dataset, str(path), preflight.thread_count(config))
    labels = ["|".join(renamed[s] for s in np.flatnonzero(row)) or NO_FINDING for row in pool.targets[:, :-1]]
    logger.info("%s: %d images; evaluating %s", path.name, len(dataset), ", ".join(evaluated) or "nothing")
    return ExternalSet(dataset, path, evaluated, missing, unknown, label_map, labels)


def external_results(external: ExternalSet, probabilities: np.ndarray) -> dict:
    """results.json's content (before localisation): AUCs of the evaluated diseases and what was left out."""
    columns = external.evaluated_columns
    disease_targets = external.dataset.targets[:, :-1]
    auc = per_class_auc(disease_targets[:, columns], probabilities[:, columns], external.evaluated)
    return dict(
        test_csv=str(external.source.resolve()),
        images=len(external.dataset),
        test=auc,
        missing_diseases=external.missing,
        ignored_labels=external.ignored,
        label_map=external.label_map,
    )


def write_predictions(path: Path, external: ExternalSet, probabilities: np.ndarray) -> None:
    """predictions.csv: image, one probability column per disease of the model, the image's labels."""
    frame = pd.DataFrame({"image": external.dataset.image_ids})
    for column, name in enumerate(external.dataset.disease_names):
        frame[name] = np.round(probabilities[:, column].astype(np.float64), 6)
    frame["labels"] = external.labels
    frame.to_csv(path, index=False)
