"""The types every part of the data layer shares; this module imports no reader.

Project contract for a dataset (STYLE.md, torchxrayvision's shape): image ids, a float32 multi-hot
target matrix [N, K] with the diseases in the source's order and "No Finding" last (1 exactly when
no disease is present), the class names, optional ground-truth boxes, and ``load_image``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

NO_FINDING = "No Finding"

Box = tuple[int, float, float, float, float]  # (class_index, x, y, w, h) in load_image pixels


class DataError(ValueError):
    """Bad input data: the message names the file and the problem."""


def data_root(config, holding: str) -> Path:
    """``--data-root`` of a source that reads one released folder (NIH, ODIR), checked to be a folder;
    ``holding`` says what the folder holds, for the error when the flag is missing."""
    if not config.data_root:
        raise DataError(f"--preset {config.dataset} needs --data-root: the folder holding {holding}")
    root = Path(config.data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder")
    return root


class UnreadableImage(DataError):
    """One image that cannot be used; the message names its path (also when raised mid-epoch)."""

    def __init__(self, path, reason: str | None = None):
        # One-argument form: a DataLoader worker re-raises exceptions as type(message), and the
        # error must stay a DataError (exit status 2, one line) with the path in its message.
        super().__init__(str(path) if reason is None else f"cannot use image {path}: {reason}")
        self.path = str(path)
        self.reason = reason or str(path)


class MultiLabelDataset(Dataset):
    """Base class: subclasses set ``image_ids``, ``targets``, ``class_names``, ``boxes`` and
    implement ``load_image``.

    targets: float32 [N, K], multi-hot, No Finding is the last column (1 iff no disease).
    boxes:   {index: [(class_index, x, y, w, h), ...]} in the pixel frame of ``load_image(index)``.
    """

    image_ids: list[str]
    targets: np.ndarray
    class_names: list[str]
    boxes: dict[int, list[Box]]

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_image(self, index: int) -> np.ndarray:
        """uint8 [H, W] (grey) or [H, W, 3]."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        return dict(image=self.load_image(index), target=self.targets[index], index=index)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def disease_names(self) -> list[str]:
        return self.class_names[:-1]


@dataclass
class DataSplits:
    train: MultiLabelDataset
    val: MultiLabelDataset
    test: MultiLabelDataset
    class_names: list[str]
    extra_tests: dict[str, MultiLabelDataset] | None = None


@dataclass(frozen=True)
class Source:
    """What the chooser (data/registry.py) needs of one data source; each source module defines one.

    class_names(config) -> the class list, No Finding last, reading at most the training labels;
    build(config)       -> the checked splits, ready to train on;
    scores(disease_targets, probabilities) -> metrics the source reports besides per-class AUC
                           ([N, C] arrays, No Finding excluded), or None for no extra metrics.
    """

    class_names: Callable[[Any], list[str]]
    build: Callable[[Any], DataSplits]
    scores: Callable[[np.ndarray, np.ndarray], dict] | None = None
