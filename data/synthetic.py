"""The built-in synthetic dataset (``--dataset synthetic``, the default): no files at all.

Every case is rendered by the procedural generator in utils/synthetic.py from one seed derived
from (``--seed``, split, index), so the splits never share a case. Labels and ground-truth boxes
come with each rendered case: six lesion types with correlated co-occurrence, "No Finding" last.
With ``--synthetic-decorrelated-test-size`` > 0 an extra test split, ``test_decorrelated``, draws
every disease independently at the same prevalences.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from data.base import DataSplits, MultiLabelDataset, Source
from utils.synthetic import SYNTHETIC_CLASS_NAMES, case_seed, render_case


class SyntheticChestXrays(MultiLabelDataset):
    """The built-in procedural dataset (utils/synthetic.py), rendered once into memory.

    Splits use disjoint seeds, so train, val and test never share a case. The split
    ``test-decorrelated`` draws every disease independently (utils.synthetic.render_case), so a
    model that learnt a disease from its usual companion is caught out there.
    """

    def __init__(self, split: str, size: int, image_size: int, seed: int = 0):
        self.split = split
        decorrelated = split == "test-decorrelated"
        self.class_names = list(SYNTHETIC_CLASS_NAMES)
        self.image_ids = [f"synthetic-{split}-{index:05d}" for index in range(size)]
        images, targets, self.boxes = [], [], {}
        for index in tqdm(range(size), desc=f"rendering synthetic {split}", leave=False, disable=None if size >= 200 else True):
            case = render_case(case_seed(seed, split, index), image_size, decorrelated=decorrelated)
            images.append(case.image)
            targets.append(case.target)
            if case.boxes:
                self.boxes[index] = list(case.boxes)
        self.images = np.stack(images) if images else np.zeros((0, image_size, image_size), np.uint8)
        self.targets = np.stack(targets).astype(np.float32) if targets else np.zeros((0, len(self.class_names)), np.float32)

    def load_image(self, index: int) -> np.ndarray:
        return self.images[index]


def build_synthetic(config) -> DataSplits:
    splits = {
        name: SyntheticChestXrays(name, size, config.image_size, seed=config.seed)
        for name, size in (
            ("train", config.synthetic_train_size),
            ("val", config.synthetic_val_size),
            ("test", config.synthetic_test_size),
        )
    }
    extra = {}
    if config.synthetic_decorrelated_test_size:
        extra["test_decorrelated"] = SyntheticChestXrays(
            "test-decorrelated", config.synthetic_decorrelated_test_size, config.image_size, seed=config.seed)
    return DataSplits(class_names=list(SYNTHETIC_CLASS_NAMES), extra_tests=extra or None, **splits)


SOURCE = Source(class_names=lambda config: list(SYNTHETIC_CLASS_NAMES), build=build_synthetic)
