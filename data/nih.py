"""NIH ChestX-ray14 (``--dataset nih``, shared/DATASETS.md).

Reads, under ``--data-root``: ``Data_Entry_2017.csv`` (or ``Data_Entry_2017_v2020.csv``) for the
labels and patients, the official lists ``train_val_list.txt`` and ``test_list.txt``, the PNGs in
``images/`` or ``images_0NN/images/``, and ``BBox_List_2017.csv`` if present.

Labels: the ``|``-separated ``Finding Labels`` of each image, multi-hot over the 14 diseases in the
paper's order, "No Finding" last and derived (1 exactly when no disease is listed). Boxes are in the
1024-px frame of the release and are rescaled to each file's own size. The validation split is a
patient-disjoint share of ``train_val_list.txt``; the test split is ``test_list.txt``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from data.base import NO_FINDING, DataError, Source, data_root
from data.pools import FileImageDataset, Plan, attach_boxes, build_splits, carve
from data.preflight import plural
from data.tables import multi_hot, origin_tag, read_box_file, read_table, refuse_duplicates, require_columns, split_labels

logger = logging.getLogger(__name__)

NIH_DISEASES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NIH_CLASS_NAMES: tuple[str, ...] = NIH_DISEASES + (NO_FINDING,)
NIH_BOX_FRAME = 1024  # BBox_List_2017.csv coordinates are in the 1024 x 1024 release PNGs


def _nih_file(root: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    raise DataError(f"NIH: no {what} in {root} (expected {' or '.join(names)})")


def index_nih_images(root: Path) -> dict[str, Path]:
    """File name -> path for ``ROOT/images/*.png`` and ``ROOT/images_0NN/images/*.png``, as unpacked."""
    folders = [root / "images"] + sorted(p / "images" for p in root.glob("images_*") if p.is_dir())
    folders += sorted(p for p in root.glob("images_*") if p.is_dir() and not (p / "images").is_dir())
    index: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:  # one directory read; no stat per file
            for entry in entries:
                if entry.name.lower().endswith(".png"):
                    index.setdefault(entry.name, Path(entry.path))
    return index


def read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_nih(config) -> Plan:
    root = data_root(config, "Data_Entry_2017.csv")
    entry_path = _nih_file(root, ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv"), "label file")
    entries = read_table(entry_path)
    require_columns(entries, ["Image Index", "Finding Labels", "Patient ID"], entry_path)
    entries["Image Index"] = entries["Image Index"].str.strip()
    refuse_duplicates(list(entries["Image Index"]), str(entry_path))
    labels = dict(zip(entries["Image Index"], entries["Finding Labels"]))
    patients = dict(zip(entries["Image Index"], entries["Patient ID"].str.strip()))
    images = index_nih_images(root)
    if not images:
        raise DataError(f"NIH: no PNG images in {root}/images/ or {root}/images_0NN/images/ (unpack images_001.tar.gz ... images_012.tar.gz there)")

    pools = {}
    for pool_name, list_name in (("train_val", "train_val_list.txt"), ("test", "test_list.txt")):
        list_path = _nih_file(root, (list_name,), "official split list")
        names = read_list(list_path)
        refuse_duplicates(names, str(list_path))
        unlisted = [name for name in names if name not in labels]
        if unlisted:
            raise DataError(f"{plural(len(unlisted), 'image')} of {list_path} without a row in {entry_path.name} (e.g. {', '.join(unlisted[:5])})")
        targets = multi_hot([split_labels(labels[name]) for name in names], NIH_DISEASES, f"{entry_path} ('Finding Labels')")
        pools[pool_name] = FileImageDataset(
            name=f"nih-{pool_name}-{origin_tag(list_path)}", source=str(list_path),
            image_paths=[images.get(name, root / "images" / name) for name in names], image_ids=names,
            targets=targets, class_names=NIH_CLASS_NAMES, channels=1,
            patient_ids=[patients[name] for name in names], box_reference_size=NIH_BOX_FRAME,
        )
    box_path = root / "BBox_List_2017.csv"
    if box_path.is_file():
        boxes = read_box_file(box_path, NIH_CLASS_NAMES)
        attached = sum(attach_boxes(pool, boxes) for pool in pools.values())
        logger.info("NIH: %d boxes on %d images from %s", attached, sum(len(p.boxes) for p in pools.values()), box_path.name)
    splits = carve(pools, "train_val", pools["train_val"].patient_ids, config)
    splits["test"] = ("test", None)
    return Plan(list(NIH_CLASS_NAMES), pools, splits, carves_validation=True)


SOURCE = Source(class_names=lambda config: list(NIH_CLASS_NAMES), build=lambda config: build_splits(config, load_nih))
