"""Pools of image files, and the checked splits a file-based reader's plan becomes.

A reader (nih, odir, csv_source) parses its files exactly as published (shared/DATASETS.md) into
*pools*, one per image list as shipped (NIH: ``train_val_list.txt`` and ``test_list.txt``; ODIR:
one annotation file per set; csv: one file per split), and returns a :class:`Plan`. The train and
validation splits are views on a pool (the validation split is a patient-disjoint share of the
training list, drawn with ``--split-seed``), so the image cache (data/image_cache.py), which works
per pool, survives a new ``--val-fraction``.

:func:`build_splits` then runs the pre-flight checks (data/preflight.py) before any model exists:
required files and columns, known labels, non-empty and disjoint splits, every image present and
decodable. All problems are :class:`data.base.DataError` with the file and the reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from data import image_cache, images, preflight
from data.base import Box, DataError, DataSplits, MultiLabelDataset, UnreadableImage

logger = logging.getLogger(__name__)


class FileImageDataset(MultiLabelDataset):
    """Images on disk with their multi-hot targets: one pool (an image list as published).

    ``channels`` is 1 (radiographs, read as grey) or 3 (fundus photos, RGB). Boxes may be declared
    in a fixed reference frame (NIH: 1024 px) and are moved into each file's own pixel frame by
    :meth:`fit_boxes_to_images` once the files are known to exist.
    """

    def __init__(self, name: str, source: str, image_paths: Sequence[Path], image_ids: Sequence[str],
                 targets: np.ndarray, class_names: Sequence[str], channels: int = 1,
                 patient_ids: Sequence[str] | None = None, boxes: dict[int, list[Box]] | None = None,
                 box_reference_size: int | None = None):
        self.name = name
        self.source = source  # where the list came from, for messages
        self.image_paths = [Path(path) for path in image_paths]
        self.image_ids = list(image_ids)
        self.targets = np.ascontiguousarray(targets, dtype=np.float32)
        self.class_names = list(class_names)
        self.channels = channels
        self.patient_ids = list(patient_ids) if patient_ids is not None else None
        self.boxes = boxes or {}
        self.box_reference_size = box_reference_size

    def load_image(self, index: int) -> np.ndarray:
        return images.read_image(self.image_paths[index], self.channels)

    def fit_boxes_to_images(self) -> None:
        if not self.box_reference_size or not self.boxes:
            return
        reference = float(self.box_reference_size)
        for index, boxes in self.boxes.items():
            height, width = images.image_frame(self.image_paths[index])
            scale_x, scale_y = width / reference, height / reference
            self.boxes[index] = [(c, x * scale_x, y * scale_y, w * scale_x, h * scale_y) for c, x, y, w, h in boxes]
        self.box_reference_size = None


class SubsetDataset(MultiLabelDataset):
    """A split that is part of a pool (train and validation carved from one training list)."""

    def __init__(self, parent: MultiLabelDataset, indices: Sequence[int], name: str):
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)
        self.name = name
        self.source = getattr(parent, "source", "")
        self.channels = getattr(parent, "channels", 1)
        self.image_ids = [parent.image_ids[i] for i in self.indices]
        self.image_paths = [parent.image_paths[i] for i in self.indices]
        parent_patients = getattr(parent, "patient_ids", None)
        self.patient_ids = [parent_patients[i] for i in self.indices] if parent_patients is not None else None
        self.targets = parent.targets[self.indices]
        self.class_names = list(parent.class_names)
        position = {int(parent_index): own for own, parent_index in enumerate(self.indices)}
        self.boxes = {position[i]: list(b) for i, b in parent.boxes.items() if i in position}

    def load_image(self, index: int) -> np.ndarray:
        return self.parent.load_image(int(self.indices[index]))


@dataclass
class Plan:
    """What a reader produced: pools, and each split as (pool name, indices or None for all)."""

    class_names: list[str]
    pools: dict[str, FileImageDataset]
    splits: dict[str, tuple[str, np.ndarray | None]]
    extra_tests: list[str] = field(default_factory=list)  # split names reported besides val/test
    carves_validation: bool = False
    probe_channels: bool = False  # grey or colour is decided from the first training image


def patient_disjoint_split(patient_ids: Sequence[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): a ``fraction`` of the patients, drawn with ``seed``,
    goes to validation with all their images. Deterministic in (patients, fraction, seed)."""
    patients = np.asarray([str(p) for p in patient_ids])
    unique = np.unique(patients)  # sorted: the draw does not depend on row order
    count = int(round(fraction * len(unique)))
    if len(unique) < 2 or count == 0 or count == len(unique):
        raise DataError(
            f"cannot carve a validation split of --val-fraction {fraction} from {len(unique)} patients: "
            f"each split needs at least one patient (give a validation list or another fraction)"
        )
    chosen = np.random.default_rng(seed).permutation(len(unique))[:count]
    is_val = np.isin(patients, unique[chosen])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def carve(plan_pools: dict, pool_name: str, patient_ids: Sequence[str], config) -> dict[str, tuple[str, np.ndarray]]:
    """The train and val splits of a plan: a patient-disjoint validation share of one pool."""
    train, val = patient_disjoint_split(patient_ids, config.val_fraction, config.split_seed)
    logger.info("validation: %d of %d images of %s (patient-disjoint, fraction %.2f, split seed %d)",
                len(val), len(train) + len(val), plan_pools[pool_name].source, config.val_fraction, config.split_seed)
    return dict(train=(pool_name, train), val=(pool_name, val))


def attach_boxes(pool: FileImageDataset, boxes: dict[str, list[Box]]) -> int:
    """Give the pool's images their boxes (matched by id, else by file name); returns how many."""
    position = {image_id: index for index, image_id in enumerate(pool.image_ids)}
    by_name = {Path(image_id).name: index for index, image_id in enumerate(pool.image_ids)}
    attached = 0
    for image, image_boxes in boxes.items():
        index = position.get(image, by_name.get(Path(image).name))
        if index is not None:
            pool.boxes[index] = list(image_boxes)
            attached += len(image_boxes)
    return attached


def probe_channels(pool: FileImageDataset) -> int:
    """Colour only if the first image really is colour (many X-ray JPEGs are grey stored as RGB)."""
    try:
        image = images.read_image(pool.image_paths[0], 3)
    except UnreadableImage:
        return 1  # the decode check reports it, together with any other offenders
    spread = np.abs(image.astype(np.int16) - image.mean(axis=2, keepdims=True).astype(np.int16)).max()
    return 3 if spread > 8 else 1


def build_splits(config, read: Callable[[Any], Plan]) -> DataSplits:
    """Run a reader, the pre-flight checks, and return the splits (cached if --cache)."""
    preflight.check_config(config, carves_validation=False)
    plan = read(config)
    preflight.check_config(config, carves_validation=plan.carves_validation)

    def members(split: str) -> tuple[FileImageDataset, np.ndarray]:
        pool_name, indices = plan.splits[split]
        pool = plan.pools[pool_name]
        return pool, (np.arange(len(pool)) if indices is None else indices)

    layout = {}
    for split in plan.splits:
        pool, indices = members(split)
        patients = [pool.patient_ids[i] for i in indices] if pool.patient_ids is not None else None
        layout[split] = ([pool.image_paths[i] for i in indices], patients)
    preflight.check_splits(layout, {split: plan.pools[plan.splits[split][0]].source for split in plan.splits})

    stats = {name: preflight.stat_images(pool.image_paths, pool.source) for name, pool in plan.pools.items()}
    channels = probe_channels(plan.pools["train"]) if plan.probe_channels else None
    for pool in plan.pools.values():
        pool.channels = channels or pool.channels
        pool.fit_boxes_to_images()
    threads = preflight.thread_count(config)
    ready: dict[str, MultiLabelDataset] = {}
    for name, pool in plan.pools.items():
        if config.cache:
            ready[name] = image_cache.cached_dataset(pool, config, pool.name, stats[name])
        else:
            if config.verify_images:
                preflight.check_decodable(pool, pool.source, threads)
            ready[name] = pool

    def view(split: str) -> MultiLabelDataset:
        pool_name, indices = plan.splits[split]
        return ready[pool_name] if indices is None else SubsetDataset(ready[pool_name], indices, split)

    splits = DataSplits(
        train=view("train"), val=view("val"), test=view("test"), class_names=list(plan.class_names),
        extra_tests={name: view(name) for name in plan.extra_tests} or None,
    )
    logger.info("%s: %d train / %d val / %d test images%s", config.dataset, len(splits.train), len(splits.val), len(splits.test),
                "".join(f" / {len(d)} {n}" for n, d in (splits.extra_tests or {}).items()))
    return splits
