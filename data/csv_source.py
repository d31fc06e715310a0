"""Any multi-label set described by CSVs (``--dataset csv``: a new hospital's list, CheXpert, VinDr-CXR).

Reads ``--train-csv`` and ``--test-csv`` (and ``--val-csv`` if given; else the validation split is a
patient-disjoint share of the training list), the images they name (relative to ``--image-root``,
else ``--data-root``, else the CSV's folder; PNG/JPEG or DICOM), and ``--boxes`` in the NIH box
format if given.

Labels come either from one ``|``-separated column (``--label-column``, or ``Finding Labels`` when
the header has it) or from one 0/1 column per class; the classes are ``--classes`` or, failing
that, the training CSV's labels or 0/1 columns. Blank means negative; -1 (uncertain) follows
``--uncertain-label``. "No Finding" is always derived, last. Several rows of one image (one per
reader) are merged: a disease counts if any row has it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data.base import NO_FINDING, DataError, Source
from data.pools import FileImageDataset, Plan, attach_boxes, build_splits, carve
from data.tables import is_no_finding, multi_hot, origin_tag, read_box_file, read_table, require_columns, split_labels

logger = logging.getLogger(__name__)

PATIENT_COLUMNS = ("Patient ID", "patient_id", "PatientID", "patient", "Patient", "subject_id")


@dataclass
class CsvLayout:
    image_column: str
    label_column: str | None
    diseases: list[str]
    class_columns: list[str]  # one 0/1 column per disease (empty with a label column)
    patient_column: str | None


def _csv_paths(config) -> dict[str, Path]:
    if not config.train_csv or not config.test_csv:
        raise DataError("--dataset csv needs --train-csv and --test-csv (and optionally --val-csv, --image-root)")
    paths = dict(train=Path(config.train_csv).expanduser())
    if config.val_csv:
        paths["val"] = Path(config.val_csv).expanduser()
    paths["test"] = Path(config.test_csv).expanduser()
    return paths


def _binary_columns(frame: pd.DataFrame, exclude: set[str]) -> list[str]:
    """Header columns whose values are all 0, 1, -1 or blank: the label columns of a one-hot CSV."""
    chosen = []
    for name in frame.columns:
        if name in exclude or name.startswith("Unnamed:"):
            continue
        values = pd.to_numeric(frame[name], errors="coerce")
        given = frame[name].notna()
        if given.any() and values[given].notna().all() and values[given].isin([0, 1, -1]).all():
            chosen.append(name)
    return chosen


def csv_layout(config, train_frame: pd.DataFrame, train_path: Path) -> CsvLayout:
    columns = list(train_frame.columns)
    if not columns:
        raise DataError(f"{train_path} has no columns")
    image_column = config.image_column or columns[0]
    require_columns(train_frame, [image_column], train_path)
    if config.patient_column:
        require_columns(train_frame, [config.patient_column], train_path)
        patient_column = config.patient_column
    else:
        patient_column = next((c for c in PATIENT_COLUMNS if c in columns and c != image_column), None)
    wanted = [c for c in config.classes if not is_no_finding(c)]
    label_column = config.label_column or ("Finding Labels" if "Finding Labels" in columns else None)
    if label_column:
        require_columns(train_frame, [label_column], train_path)
        if wanted:
            diseases = wanted
        else:
            found = {label for value in train_frame[label_column] for label in split_labels(value)}
            diseases = sorted(label for label in found if not is_no_finding(label))
            logger.info("classes from the labels of %s: %s", train_path.name, ", ".join(diseases))
        return CsvLayout(image_column, label_column, diseases, [], patient_column)
    if wanted:
        require_columns(train_frame, wanted, train_path)
        diseases = wanted
    else:
        diseases = [c for c in _binary_columns(train_frame, {image_column, patient_column}) if not is_no_finding(c)]
        if not diseases:
            raise DataError(f"{train_path}: no label columns found (0/1 values); name them with --classes, "
                            f"or give a '|'-separated column with --label-column")
        logger.info("classes from the header of %s: %s", train_path.name, ", ".join(diseases))
    return CsvLayout(image_column, None, diseases, list(diseases), patient_column)


def _class_column_targets(frame: pd.DataFrame, layout: CsvLayout, path: Path, uncertain: str) -> np.ndarray:
    require_columns(frame, layout.class_columns, path)
    values = frame[layout.class_columns].apply(pd.to_numeric, errors="coerce")
    given = frame[layout.class_columns].notna()
    bad = given & ~values.isin([0, 1, -1])
    if bad.to_numpy().any():
        row, column = np.argwhere(bad.to_numpy())[0]
        raise DataError(
            f"{path}: {int(bad.to_numpy().sum())} label values are not 0/1, e.g. {frame.iloc[row, frame.columns.get_loc(layout.class_columns[column])]!r} "
            f"in column {layout.class_columns[column]!r} of row {row + 2}"
        )
    matrix = values.fillna(0).to_numpy(dtype=np.float32, copy=True)  # blank = not mentioned = negative (CheXpert)
    if (matrix == -1).any():
        if uncertain == "error":
            raise DataError(f"{path}: {int((matrix == -1).sum())} labels are -1 (uncertain); choose --uncertain-label zero or one")
        matrix[matrix == -1] = 1.0 if uncertain == "one" else 0.0
    targets = np.zeros((len(frame), len(layout.diseases) + 1), dtype=np.float32)
    targets[:, :-1] = matrix
    targets[:, -1] = matrix.sum(axis=1) == 0
    stated_column = next((c for c in frame.columns if is_no_finding(c)), None)
    if stated_column is not None:
        stated = pd.to_numeric(frame[stated_column], errors="coerce").fillna(0).to_numpy() == 1
        conflicts = int((stated & (matrix.sum(axis=1) > 0)).sum())
        if conflicts:
            logger.warning("%s: %d rows say No Finding and list a disease; No Finding is derived from the diseases", path, conflicts)
    return targets


def _merge_repeated_rows(image_ids, targets, patients, path):
    """Several rows for one image (VinDr-CXR: one per radiologist) -> one row, a disease is
    present if any row says so."""
    first: dict[str, int] = {}
    for row, image_id in enumerate(image_ids):
        first.setdefault(image_id, row)
    if len(first) == len(image_ids):
        return image_ids, targets, patients
    group = np.array([first[image_id] for image_id in image_ids])
    keep = np.array(sorted(first.values()))
    merged = np.zeros((len(image_ids), targets.shape[1]), dtype=np.float32)
    np.maximum.at(merged, group, targets)
    merged = merged[keep]
    merged[:, -1] = merged[:, :-1].sum(axis=1) == 0
    logger.info("%s: %d images have several rows (e.g. one per reader); merged, a disease counts if any row has it",
                path, len(image_ids) - len(first))
    return [image_ids[i] for i in keep], merged, ([patients[i] for i in keep] if patients is not None else None)


def _with_suffix(paths: list[Path]) -> list[Path]:
    """Ids without a file suffix (VinDr-CXR's image_id): take the suffix the first such file has on disk."""
    bare = [p for p in paths if not p.suffix]
    if not bare or bare[0].exists():
        return paths
    for suffix in (".png", ".jpg", ".jpeg", ".dicom", ".dcm"):
        if bare[0].with_name(bare[0].name + suffix).exists():
            logger.info("image ids have no file suffix: using %s", suffix)
            return [p.with_name(p.name + suffix) if not p.suffix else p for p in paths]
    return paths


def load_csv(config) -> Plan:
    if config.uncertain_label not in ("error", "zero", "one"):
        raise DataError(f"--uncertain-label {config.uncertain_label!r}: choose error, zero or one")
    paths = _csv_paths(config)
    frames = {name: read_table(path) for name, path in paths.items()}
    layout = csv_layout(config, frames["train"], paths["train"])
    image_root = Path(config.image_root or config.data_root or paths["train"].parent).expanduser()
    pools = {}
    for name, frame in frames.items():
        path = paths[name]
        require_columns(frame, [layout.image_column] + ([layout.label_column] if layout.label_column else []), path)
        if layout.label_column:
            label_sets = [[NO_FINDING if is_no_finding(label) else label for label in split_labels(v)]
                          for v in frame[layout.label_column]]
            targets = multi_hot(label_sets, layout.diseases, f"{path} ({layout.label_column!r})")
        else:
            targets = _class_column_targets(frame, layout, path, config.uncertain_label)
        image_ids = [str(v).strip() for v in frame[layout.image_column]]
        patients = None
        if layout.patient_column and layout.patient_column in frame.columns:
            patients = [str(v).strip() for v in frame[layout.patient_column]]
        image_ids, targets, patients = _merge_repeated_rows(image_ids, targets, patients, path)
        pools[name] = FileImageDataset(
            name=f"csv-{name}-{origin_tag(path, image_root)}", source=str(path),
            image_paths=_with_suffix([Path(v) if Path(v).is_absolute() else image_root / v for v in image_ids]),
            image_ids=image_ids, targets=targets, class_names=layout.diseases + [NO_FINDING],
            channels=1, patient_ids=patients,
        )
    if config.boxes:
        boxes = read_box_file(Path(config.boxes).expanduser(), layout.diseases + [NO_FINDING])
        attached = sum(attach_boxes(pool, boxes) for pool in pools.values())
        logger.info("%d boxes attached from %s", attached, config.boxes)
    if "val" in pools:
        splits = dict(train=("train", None), val=("val", None))
    else:
        train = pools["train"]
        groups = train.patient_ids if train.patient_ids is not None else train.image_ids
        if train.patient_ids is None:
            logger.warning("%s has no patient column: the validation split is drawn per image", paths["train"])
        splits = carve(pools, "train", groups, config)
    splits["test"] = ("test", None)
    return Plan(layout.diseases + [NO_FINDING], pools, splits, carves_validation="val" not in pools, probe_channels=True)


def csv_class_names(config) -> list[str]:
    """The class list the training CSV implies (reads its labels, no images)."""
    paths = _csv_paths(config)
    layout = csv_layout(config, read_table(paths["train"]), paths["train"])
    return layout.diseases + [NO_FINDING]


SOURCE = Source(class_names=csv_class_names, build=lambda config: build_splits(config, load_csv))
