"""ODIR (``--dataset odir``: ODIR-5K / OIA-ODIR, shared/DATASETS.md).

Reads, anywhere under ``--data-root``: the training annotation (``training annotation
(English).xlsx`` or ``ODIR-5K_Training_Annotations(Updated)_V2.xlsx``, or the Kaggle CSV copy
``full_df.csv``), the on-site and off-site test annotations (``--odir-test-sets``), and the fundus
photos they name (found by file name).

Labels are made **per eye**, as the paper trains: each eye's diagnostic keywords (split on the
full-width comma) map to D, G, C, A, H, M, O or N through :data:`ODIR_KEYWORD_CLASSES` and two
patterns; image-quality remarks are skipped, an eye with a disease is not Normal, and an eye left
with no label is dropped. The per-patient N..O columns are only compared with the eyes' union (and
disagreements logged). N (normal) plays No Finding, last. Results also carry the official ODIR score.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from data.base import DataError, Source, data_root
from data.images import IMAGE_SUFFIXES
from data.pools import FileImageDataset, Plan, build_splits, carve
from data.tables import multi_hot, origin_tag, read_table, refuse_duplicates, require_columns
from utils.metrics import odir_score

logger = logging.getLogger(__name__)

ODIR_DISEASES: tuple[str, ...] = ("D", "G", "C", "A", "H", "M", "O")
ODIR_CLASS_NAMES: tuple[str, ...] = ODIR_DISEASES + ("N",)  # N (normal) plays No Finding
ODIR_COLUMNS = ("ID", "Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords", "Right-Diagnostic Keywords")
ODIR_QUALITY_KEYWORDS = frozenset({
    "lens dust", "low image quality", "no fundus image", "image offset",
    "optic disk photographically invisible", "anterior segment image",
})
ODIR_KEYWORD_CLASSES = {
    "glaucoma": "G", "suspected glaucoma": "G",
    "cataract": "C", "suspected cataract": "C",
    "hypertensive retinopathy": "H", "mild hypertension": "H", "sever hypertension": "H", "severe hypertension": "H",
    "pathological myopia": "M", "suspected pathological myopia": "M", "myopia retinopathy": "M",
    "myopic retinopathy": "M", "myopic maculopathy": "M",
    "normal fundus": "N",
}
# "mild nonproliferative retinopathy", "moderate non proliferative retinopathy" (sic, with a space),
# "severe nonproliferative retinopathy", "proliferative diabetic retinopathy", "diabetic retinopathy",
# and "suspected ..." variants; "proliferative vitreoretinopathy" is not diabetic retinopathy.
ODIR_DIABETIC = re.compile(r"(non ?proliferative retinopathy|diabetic retinopathy)$")
ODIR_AMD = re.compile(r"age-related macular degeneration$")
ODIR_KEYWORD_SEPARATOR = re.compile(r"[，,]")  # the full-width comma (and, leniently, an ASCII one)
ODIR_ANNOTATION_NAMES = {
    # normalised file stem (lower case, letters and digits only) -> set
    "train": ("trainingannotationenglish", "odir5ktrainingannotationsupdatedv2", "odir5ktrainingannotations", "fulldf"),
    "on-site": ("onsitetestannotationenglish", "onsitetestannotation"),
    "off-site": ("offsitetestannotationenglish", "offsitetestannotation"),
}
TABLE_SUFFIXES = (".xlsx", ".xls", ".csv")


# ----------------------------------------------------------------------------------------------
# Keywords -> labels of one eye
# ----------------------------------------------------------------------------------------------
def odir_keyword_class(keyword: str) -> str | None:
    """One diagnostic keyword -> its class letter; None for image-quality keywords."""
    keyword = " ".join(keyword.strip().lower().split())
    if not keyword or keyword in ODIR_QUALITY_KEYWORDS:
        return None
    if keyword in ODIR_KEYWORD_CLASSES:
        return ODIR_KEYWORD_CLASSES[keyword]
    if ODIR_DIABETIC.search(keyword):
        return "D"
    if ODIR_AMD.search(keyword):
        return "A"
    return "O"


def odir_eye_labels(keywords) -> set[str]:
    """One eye's keyword cell -> its classes (DATASETS.md): an eye with a disease is not Normal;
    an empty set means the eye carries no label (only quality remarks) and is dropped."""
    if keywords is None or (isinstance(keywords, float) and np.isnan(keywords)):
        return set()
    classes = {odir_keyword_class(part) for part in ODIR_KEYWORD_SEPARATOR.split(str(keywords))}
    classes.discard(None)
    if classes - {"N"}:
        classes.discard("N")
    return classes


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def _normalised_stem(path: Path) -> str:
    return re.sub(r"[^a-z0-9]", "", path.stem.lower())


def find_odir_annotation(root: Path, kind: str) -> Path | None:
    wanted = ODIR_ANNOTATION_NAMES[kind]
    found = [p for p in root.rglob("*") if p.suffix.lower() in TABLE_SUFFIXES and _normalised_stem(p) in wanted
             and ".cipl-cache" not in p.parts]
    # The spreadsheet as published beats a CSV copy; then the shallowest.
    found.sort(key=lambda p: (p.suffix.lower() == ".csv", len(p.parts), str(p)))
    return found[0] if found else None


def index_images(root: Path) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for directory, folders, files in os.walk(root):
        folders[:] = [f for f in folders if f != ".cipl-cache"]
        for name in files:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                index.setdefault(name, []).append(Path(directory) / name)
    return index


def _nearest(candidates: list[Path], anchor: Path) -> Path:
    """Of several files with one name (an image in two ODIR sets), the one nearest the annotation."""
    def shared(path: Path) -> int:
        return len(os.path.commonpath([str(path), str(anchor)]))
    return max(candidates, key=lambda p: (shared(p), -len(str(p))))


def read_odir_annotation(path: Path, images: dict[str, list[Path]], pool_name: str) -> FileImageDataset:
    frame = read_table(path)
    require_columns(frame, ODIR_COLUMNS, path)
    frame["ID"] = frame["ID"].astype(str).str.strip()
    frame = frame.drop_duplicates(subset="ID")  # the Kaggle full_df.csv repeats each patient per eye
    paths, image_ids, patients, label_sets, dropped = [], [], [], [], 0
    missing = []
    for row in frame.itertuples(index=False):
        record = dict(zip(frame.columns, row))
        for side in ("Left", "Right"):
            file_name = str(record[f"{side}-Fundus"]).strip()
            classes = odir_eye_labels(record[f"{side}-Diagnostic Keywords"])
            if not classes:
                dropped += 1
                continue
            candidates = images.get(file_name)
            if not candidates:
                missing.append(len(paths))
            paths.append(_nearest(candidates, path.parent) if candidates else Path(file_name))
            image_ids.append(file_name)
            patients.append(record["ID"])
            label_sets.append(classes)
    if missing:  # report them where this set's other images are (the existence check names them)
        found = [paths[i].parent for i in range(len(paths)) if i not in set(missing)]
        home = max(set(found), key=found.count) if found else path.parent
        for i in missing:
            paths[i] = home / paths[i]
    refuse_duplicates(image_ids, str(path))
    targets = multi_hot(label_sets, ODIR_DISEASES, str(path), no_finding="N")
    logger.info("ODIR %s: %d eyes from %d patients (%d eyes without a diagnosis dropped)",
                path.name, len(image_ids), len(frame), dropped)
    _compare_with_patient_labels(frame, image_ids, patients, targets, path)
    return FileImageDataset(
        name=f"odir-{pool_name}-{origin_tag(path)}", source=str(path), image_paths=paths, image_ids=image_ids,
        targets=targets, class_names=ODIR_CLASS_NAMES, channels=3, patient_ids=patients,
    )


def _compare_with_patient_labels(frame, image_ids, patients, targets, path) -> None:
    """The per-patient N..O columns should be the union of the two eyes; report disagreements."""
    letters = [c for c in ODIR_CLASS_NAMES if c in frame.columns]
    if len(letters) < len(ODIR_CLASS_NAMES):
        return
    union: dict[str, np.ndarray] = {}
    for patient, target in zip(patients, targets):
        union[patient] = np.maximum(union.get(patient, 0), target)
    disagree = 0
    for row in frame.itertuples(index=False):
        record = dict(zip(frame.columns, row))
        if record["ID"] not in union:
            continue
        eyes = union[record["ID"]].copy()
        eyes[-1] = float(eyes[:-1].sum() == 0)
        try:
            given = np.array([float(record[c]) for c in ODIR_CLASS_NAMES])
        except (TypeError, ValueError):
            continue
        disagree += int(not np.array_equal(given, eyes))
    if disagree:
        logger.info("ODIR %s: %d patients whose N..O columns differ from their eyes' keywords (keywords used, as the paper)",
                    path.name, disagree)


# ----------------------------------------------------------------------------------------------
# The source
# ----------------------------------------------------------------------------------------------
def load_odir(config) -> Plan:
    root = data_root(config, "the ODIR annotation files and images")
    test_sets = list(config.odir_test_sets) or ["on-site"]
    unknown = [name for name in test_sets if name not in ("on-site", "off-site")]
    if unknown:
        raise DataError(f"--odir-test-sets: unknown set(s) {', '.join(unknown)}; choose from on-site, off-site")
    annotations: dict[str, Path] = {}
    for kind, given in (("train", config.train_csv), *((name, config.test_csv if i == 0 else "") for i, name in enumerate(test_sets))):
        path = Path(given) if given else find_odir_annotation(root, kind)
        if path is None:
            expected = {"train": "'training annotation (English).xlsx' or 'ODIR-5K_Training_Annotations(Updated)_V2.xlsx'",
                        "on-site": "'on-site test annotation (English).xlsx'",
                        "off-site": "'off-site test annotation (English).xlsx'"}[kind]
            raise DataError(f"ODIR: no {kind} annotation under {root} (expected {expected}, or a CSV copy)")
        annotations[kind] = path
    images = index_images(root)
    pools = {kind: read_odir_annotation(path, images, kind) for kind, path in annotations.items()}
    if config.val_csv:
        pools["val"] = read_odir_annotation(Path(config.val_csv), images, "val")
        splits = dict(train=("train", None), val=("val", None))
    else:
        splits = carve(pools, "train", pools["train"].patient_ids, config)
    splits["test"] = (test_sets[0], None)
    extra = []
    for name in test_sets[1:]:
        split_name = name.replace("-", "")  # "offsite": a plain results.json key
        splits[split_name] = (name, None)
        extra.append(split_name)
    return Plan(list(ODIR_CLASS_NAMES), pools, splits, extra_tests=extra, carves_validation=not config.val_csv)


def odir_scores(disease_targets: np.ndarray, probabilities: np.ndarray) -> dict:
    """The official ODIR score on one split: kappa, micro F1, AUC and their mean."""
    return dict(odir_score=odir_score(np.asarray(disease_targets), np.asarray(probabilities)))


SOURCE = Source(
    class_names=lambda config: list(ODIR_CLASS_NAMES),
    build=lambda config: build_splits(config, load_odir),
    scores=odir_scores,
)
