"""The two-view transform, the dataset wrappers and the class-balanced (pair) sampler.

Composable pieces (STYLE.md):

* a *base* dataset per source (:class:`MultiLabelDataset`, data/base.py; one reader module per
  source in data/): image ids, a multi-hot target matrix with No Finding last, class names,
  optional ground-truth boxes, and ``load_image``;
* wrappers that add what a stage needs: :class:`TransformedDataset` (one view, for warm-up and
  evaluation) and :class:`PairedTwoViewDataset` (an anchor and its label-sharing partner, two
  nearly pixel-aligned views each, for the paired stage);
* :class:`ClassBalancedSampler`, which draws anchors (and, for pairs, partners) from the data's own
  class counts.

The data layer's entry points (:func:`build_datasets`, :func:`class_names_for`) and the synthetic
dataset are importable from here too, so scripts need one import for their data.
"""
from __future__ import annotations

import logging
import math
from typing import Iterator

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from data.base import DataError, MultiLabelDataset
# The data layer's entry points, re-exported: callers build their data with one import from here.
from data.registry import build_datasets, class_names_for  # noqa: F401
from data.synthetic import SyntheticChestXrays  # noqa: F401

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------
def to_image_tensor(image: np.ndarray) -> Tensor:
    """uint8 [H, W] or [H, W, 3] -> uint8 tensor [C, H, W] (C = 1 or 3)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image))
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def _finish(image: Tensor) -> Tensor:
    """uint8 [1|3, S, S] -> normalised float [3, S, S] (grey images repeated to 3 channels)."""
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    image = image.float().div_(255)
    return v2.functional.normalize(image, IMAGENET_MEAN, IMAGENET_STD)


class EvalTransform:
    """Deterministic resize to the model resolution (evaluation, push, reasoning)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image: np.ndarray) -> Tensor:
        tensor = to_image_tensor(image)
        if tensor.shape[-2:] != (self.image_size, self.image_size):
            tensor = v2.functional.resize(tensor, [self.image_size, self.image_size], antialias=True)
        return _finish(tensor)


class RandomSharpness(torch.nn.Module):
    """Sharpness factor drawn uniformly in [low, high] (torchvision's version takes a fixed factor)."""

    def __init__(self, low: float = 0.8, high: float = 1.2):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, image: Tensor) -> Tensor:
        factor = self.low + (self.high - self.low) * torch.rand(()).item()
        return v2.functional.adjust_sharpness(image, factor)


class RandomElastic(torch.nn.Module):
    """Elastic deformation: a random displacement field, Gaussian-smoothed (sigma px) and scaled
    (alpha px), applied with bilinear remapping. Written with OpenCV because torchvision's version
    blurs the field with a dense 2-D kernel, which costs ~10x more on large images; randomness
    comes from torch's generator, so per-sample seeding still governs it."""

    def __init__(self, alpha: float, sigma: float):
        super().__init__()
        self.alpha, self.sigma = alpha, sigma

    def forward(self, image: Tensor) -> Tensor:
        channels, height, width = image.shape
        field = (torch.rand(2, height, width) * 2 - 1).numpy()
        dx = cv2.GaussianBlur(field[0], (0, 0), self.sigma) * self.alpha
        dy = cv2.GaussianBlur(field[1], (0, 0), self.sigma) * self.alpha
        grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float32)
        pixels = image.permute(1, 2, 0).contiguous().numpy()
        warped = cv2.remap(pixels, grid_x + dx, grid_y + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        warped = warped.reshape(height, width, channels)
        return torch.from_numpy(warped).permute(2, 0, 1).contiguous()


class RandomGaussianBlur(torch.nn.Module):
    """Gaussian blur with sigma drawn uniformly in [low, high], with OpenCV's separable filter
    (torchvision's dense kernel is ~10x slower at 512 px)."""

    def __init__(self, low: float = 0.5, high: float = 2.0):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, image: Tensor) -> Tensor:
        sigma = self.low + (self.high - self.low) * torch.rand(()).item()
        pixels = image.permute(1, 2, 0).contiguous().numpy()
        blurred = cv2.GaussianBlur(pixels, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
        return torch.from_numpy(blurred.reshape(pixels.shape)).permute(2, 0, 1).contiguous()


class Cutout(torch.nn.Module):
    """Blank one square of side ``fraction`` x image size at a random position."""

    def __init__(self, fraction: float):
        super().__init__()
        self.fraction = fraction

    def forward(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        side = max(1, round(self.fraction * min(height, width)))
        top = int(torch.randint(0, max(1, height - side + 1), ()))
        left = int(torch.randint(0, max(1, width - side + 1), ()))
        image = image.clone()
        image[..., top : top + side, left : left + side] = 0
        return image


class TwoViewTransform:
    """One shared strong transform, then two nearly pixel-aligned views (METHOD.md).

    The shared part (random resized crop to margin x size, one RandAugment-style op, flips, affine)
    is drawn once per image so both views show the same geometry; each view then gets its own
    photometric jitter, blur and a tiny resized crop, so the EMA teacher's view differs only slightly.
    With ``config.strong_augmentation`` off the shared part is left out.
    """

    def __init__(self, config):
        size = config.image_size
        margin_size = round(config.crop_margin * size)
        self.shared = v2.Compose([
            v2.RandomResizedCrop(margin_size, scale=(config.crop_scale_min, 1.0), ratio=(0.5, 2.0), antialias=True),
            v2.RandomChoice([
                v2.ColorJitter(saturation=(0.8, 1.2)),
                v2.ColorJitter(contrast=(0.8, 1.2)),
                v2.ColorJitter(brightness=(0.8, 1.2)),
                RandomSharpness(0.8, 1.2),
                RandomElastic(alpha=50.0 * size / 512, sigma=5.0 * size / 512),
                Cutout(25 / 512),
            ]),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomAffine(
                degrees=config.affine_degrees,
                translate=(config.affine_translate, config.affine_translate),
                scale=(config.affine_scale_min, config.affine_scale_max),
                shear=config.affine_shear,
            ),
        ])
        self.per_view = v2.Compose([
            v2.ColorJitter(brightness=(0.8, 1.2), contrast=(0.8, 1.2), saturation=(0.8, 1.2), hue=(-0.01, 0.01)),
            # METHOD.md's sigma 0.5-2 px is for 512-px images; like the elastic field and the cutout it
            # scales with the resolution, or a 128-px image would be blurred four times as hard.
            v2.RandomApply([RandomGaussianBlur(0.5 * size / 512, 2.0 * size / 512)], p=0.5),
            v2.RandomResizedCrop(size, scale=(0.95, 1.0), ratio=(0.95, 1.05), antialias=True),
        ])
        if not config.strong_augmentation:
            self.shared = v2.Identity()

    def __call__(self, image: np.ndarray) -> tuple[Tensor, Tensor]:
        shared = self.shared(to_image_tensor(image))
        return _finish(self.per_view(shared)), _finish(self.per_view(shared))


class SingleViewTransform(TwoViewTransform):
    """The warm-up stage's augmentation: the shared transform plus one view's jitter."""

    def __call__(self, image: np.ndarray) -> Tensor:
        return _finish(self.per_view(self.shared(to_image_tensor(image))))


# ----------------------------------------------------------------------------------------------
# Wrappers
# ----------------------------------------------------------------------------------------------
class TransformedDataset(Dataset):
    """One transformed view per image: {"image", "target", "index"}."""

    def __init__(self, base: MultiLabelDataset, transform):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item) -> dict:
        index = _seeded(item)
        return dict(
            image=self.transform(self.base.load_image(index)),
            target=torch.from_numpy(self.base.targets[index]),
            index=index,
        )


class PairedTwoViewDataset(Dataset):
    """Indexed by (anchor, partner) pairs from :class:`ClassBalancedSampler`.

    Returns views [2, 3, S, S] (student inputs), views_prime [2, 3, S, S] (teacher inputs),
    targets [2, K] and indices [2] — anchor first, partner second.
    """

    def __init__(self, base: MultiLabelDataset, transform: TwoViewTransform):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int, int]) -> dict:
        pair = _seeded(item)
        views, views_prime = zip(*(self.transform(self.base.load_image(i)) for i in pair))
        return dict(
            views=torch.stack(views),
            views_prime=torch.stack(views_prime),
            targets=torch.from_numpy(self.base.targets[list(pair)]),
            indices=torch.tensor(pair),
        )


def _seeded(item):
    """Sampler items carry their own augmentation seed as a last element: (index, seed) or
    (anchor, partner, seed). Seeding per sample makes the augmentation of a sample independent of
    the number of loader workers and of processes; a plain index is used as is."""
    if isinstance(item, (tuple, list)):
        torch.manual_seed(item[-1])
        return item[0] if len(item) == 2 else tuple(item[:-1])
    return item


def unpack_pairs(batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[B, 2, ...] pair batch -> (x, x', targets, indices) with anchors [0:B] then partners [B:2B]."""
    def flat(tensor: Tensor) -> Tensor:
        return tensor.transpose(0, 1).reshape(-1, *tensor.shape[2:])

    return flat(batch["views"]), flat(batch["views_prime"]), flat(batch["targets"]), flat(batch["indices"])


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def class_sampling_weights(targets: np.ndarray, cap: float, no_finding_multiplier: float) -> np.ndarray:
    """Per-class weights w_c = (all positive labels) / count_c, capped, No Finding multiplied.

    targets [N, K] -> [K]. A class with no images gets weight 0 (it can never be drawn anyway).
    """
    counts = targets.sum(axis=0)
    with np.errstate(divide="ignore"):
        weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1), 0.0)
    weights = np.minimum(weights, cap)
    weights[-1] *= no_finding_multiplier
    return weights


def image_sampling_weights(targets: np.ndarray, cap: float, no_finding_multiplier: float) -> np.ndarray:
    """An image's weight = mean of its positive classes' weights: [N, K] -> [N]."""
    class_weights = class_sampling_weights(targets, cap, no_finding_multiplier)
    positives = targets.sum(axis=1)
    return (targets @ class_weights) / np.maximum(positives, 1)


class ClassBalancedSampler(Sampler):
    """Class-balanced anchors, optionally each with a label-sharing partner (METHOD.md).

    Partner of anchor a: one of a's positive classes uniformly (No Finding counts), then an image
    uniformly among the training images of that class. Everything is drawn from a generator seeded
    by (seed, epoch), so an epoch's order is reproducible and independent of how many epochs ran in
    this process (exact resume). With ``num_replicas`` > 1 each rank takes a disjoint share of one
    global draw, so an epoch means the same number of samples as on one process.
    """

    def __init__(
        self,
        targets: np.ndarray,
        num_samples: int,
        cap: float,
        no_finding_multiplier: float,
        paired: bool,
        seed: int = 0,
        rank: int = 0,
        num_replicas: int = 1,
    ):
        self.targets = torch.as_tensor(targets, dtype=torch.float64)
        self.weights = torch.as_tensor(image_sampling_weights(targets, cap, no_finding_multiplier))
        if float(self.weights.sum()) <= 0:
            raise DataError("no labelled training images to sample from")
        self.num_samples = num_samples
        self.paired = paired
        self.seed = seed
        self.rank = rank
        self.num_replicas = num_replicas
        self.epoch = 0
        # Members of each class as one flat index list with offsets: partner draw without a loop.
        members = [torch.nonzero(self.targets[:, c], as_tuple=True)[0] for c in range(self.targets.shape[1])]
        self.class_counts = torch.tensor([len(m) for m in members])
        self.class_offsets = torch.cumsum(self.class_counts, 0) - self.class_counts
        self.class_members = torch.cat(members)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.num_replicas)

    def draw(self) -> Tensor:
        """All replicas' samples for this epoch: [num_samples, 2] rows (anchor, augmentation seed),
        or [num_samples, 3] rows (anchor, partner, augmentation seed) when paired."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        anchors = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=generator)
        if not self.paired:
            return torch.stack([anchors, seeds], dim=1)
        partner_class = torch.multinomial(self.targets[anchors], 1, generator=generator).squeeze(1)
        position = (torch.rand(self.num_samples, generator=generator, dtype=torch.float64) * self.class_counts[partner_class]).long()
        partners = self.class_members[self.class_offsets[partner_class] + position]
        return torch.stack([anchors, partners, seeds], dim=1)

    def __iter__(self) -> Iterator:
        samples = self.draw()
        total = len(self) * self.num_replicas
        if total > len(samples):  # pad so every rank gets the same count
            samples = torch.cat([samples, samples[: total - len(samples)]])
        shard = samples[self.rank : total : self.num_replicas]
        return iter([tuple(row) for row in shard.tolist()])
