"""Weakly-supervised localisation (METHOD.md "Metrics"): evidence map -> box -> IoU, IoBB, pointing game.

Two maps are compared on the same model, for the ground-truth class of every boxed test image:

* ``cipl``: the class evidence map E_c(h, w) = sum_j W_cj exp(-d_j(h, w) / D), each prototype's
  similarity map weighted by its last-layer weight: where the class logit l_c = sum_j W_cj max_hw
  exp(-d_j / D) gets its evidence from. (A max over the class's maps instead lets one prototype that
  matches every image at ~0.999, which contributes a constant to the logit, decide the map alone;
  measured on synthetic runs its pointing game swung between 0.17 and 0.64, the weighted sum's did not);
* ``gradcam``: Grad-CAM from the ``grad-cam`` package (pytorch_grad_cam) on the same network, with
  the disease's logit margin l_c - l_NF as the target, since P(c) = sigmoid(l_c - l_NF) is what the
  model reports.

Both maps are taken at feature-map resolution, and each cell is placed in the image where its
receptive field is centred (the model's :meth:`~model.CIPL.cell_grid`; plain resizing would draw the
tiny backbone's maps 3.5 px and a ResNet's 15.5 px down and right of where their cells look).
Pointing game: the map's highest cell, at its centre (located on the map itself, not after
upsampling; see :func:`peak_points`). Map -> box: upsample bilinearly between the cell centres to
the model's input resolution, min-max normalise, keep pixels >= threshold, take the 8-connected
component that holds the peak and its bounding box. Ground-truth boxes
(dataset ``boxes``, in the pixel frame of ``load_image``) are scaled into the same frame; IoU, IoBB
(intersection / predicted-box area) and the pointing game do not change under that scaling except
for pixel rounding. A map without variation (e.g. a Grad-CAM whose weighted activations are all <= 0,
which its ReLU turns into zeros) points nowhere: its box is the whole image and the pointing game
counts a miss.

A *case* is one (image, disease) pair with at least one ground-truth box; where a disease has several
boxes in one image (several nodules), the case scores its best box (and the pointing game hits if
the peak falls in any of them). Accuracy at IoU >= T is the share of cases that reach T; a class's
numbers average its cases, the reported ``mean`` averages the classes. Each class also gets the
median offset of the peak from the centre of the case's nearest box (``peak_offset_y``, ``_x``): a
map shifted the same way in every class describes what lies beside its cells, a shift that
image-level training cannot see and only boxes reveal.

    python -m utils.localisation RUN/results.json [OTHER_RUN/results.json ...]   # print the tables
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from torch import Tensor, nn
from tqdm import tqdm

from datasets import EvalTransform
from model import CellGrid

logger = logging.getLogger(__name__)

THRESHOLDS = (0.1, 0.25, 0.5, 0.75)
METHODS = ("cipl", "gradcam")
METHOD_TITLES = {"cipl": "CIPL", "gradcam": "Grad-CAM"}
GRADCAM_LAYERS = ("backbone", "add_on")
SCORE_KEYS = (
    [f"iou_{t}" for t in THRESHOLDS] + [f"iobb_{t}" for t in THRESHOLDS] + ["pointing", "mean_iou"]
)
# Median over a class's cases of where the map's peak lies from the centre of the nearest of the case's
# boxes, in pixels of the image_size frame (y down, x right). A map that points at the lesion gives ~0;
# a learnt shift of the evidence (features that describe what lies beside their cell, which no
# image-level label can notice) gives the same sign in every class.
OFFSET_KEYS = ("peak_offset_y", "peak_offset_x")


# ----------------------------------------------------------------------------------------------
# Maps -> boxes
# ----------------------------------------------------------------------------------------------
def _axis_grid(grid: CellGrid | None, cells: int, length: int) -> CellGrid:
    """``grid``, or without one ``cells`` equal slices of an axis ``length`` pixels long."""
    return grid or CellGrid.equal_slices(cells, length)


def cell_centre_points(rows, cols, map_size: tuple[int, int], out_size: tuple[int, int],
                       grid: CellGrid | None = None) -> np.ndarray:
    """Cells (rows, cols) of an h x w map -> their centres (y, x) in pixels of an out_size image,
    placed by ``grid`` (without one, at the centres of equal slices): [n, 2] float."""
    (height, width), (out_height, out_width) = map_size, out_size
    y = _axis_grid(grid, height, out_height).centres(np.asarray(rows, np.float64), out_height)
    x = _axis_grid(grid, width, out_width).centres(np.asarray(cols, np.float64), out_width)
    return np.stack([y, x], axis=1)


def upsample_maps(maps: Tensor, size: tuple[int, int], grid: CellGrid | None = None) -> Tensor:
    """[N, h, w] -> [N, H, W], bilinear between the cell centres that ``grid`` (the model's
    :meth:`~model.CIPL.cell_grid`) places in the image, holding the edge values beyond the outer
    centres; float64 stays float64. Without a grid each cell is taken to be an equal slice of the
    image, which is plain resizing (F.interpolate, half-pixel centres, like cv2.resize)."""
    maps = maps if maps.dtype == torch.float64 else maps.float()
    for axis, length in ((-2, size[0]), (-1, size[1])):
        cells = maps.shape[axis]
        axis_grid = _axis_grid(grid, cells, length)
        # Position of each output pixel's centre, in cells: 0 at the first cell's centre.
        first, spacing = axis_grid.centres(0, length), axis_grid.centres(1, length) - axis_grid.centres(0, length)
        position = (torch.arange(length, dtype=maps.dtype, device=maps.device) + 0.5 - first) / spacing
        position = position.clamp(0, cells - 1)
        lower = position.floor().long()
        upper = (lower + 1).clamp(max=cells - 1)
        shape = [length if dim == maps.ndim + axis else 1 for dim in range(maps.ndim)]
        weight = (position - lower).view(shape)
        below, above = maps.index_select(axis, lower), maps.index_select(axis, upper)
        maps = below + (above - below) * weight
    return maps


def normalise_maps(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min-max normalise each [H, W] map of [N, H, W]; returns (maps in [0, 1], flat [N] bool).

    A flat map carries no location: it becomes all zeros and is reported as flat.
    """
    maps = np.asarray(maps, dtype=np.float64)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    flat = span[:, 0, 0] <= 1e-12 * np.maximum(1.0, np.abs(low[:, 0, 0]))
    normalised = np.where(span > 0, (maps - low) / np.where(span > 0, span, 1.0), 0.0)
    normalised[flat] = 0.0
    return normalised, flat


def maps_to_boxes(maps: np.ndarray, threshold: float | np.ndarray = 0.5,
                  seeds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Boxes around the high-evidence region of each map.

    maps [N, H, W] (any scale; normalised here), threshold a fraction of the normalised range, scalar
    or [N]. The box is that of the 8-connected above-threshold component holding ``seeds[i]`` (row, col)
    when given and above threshold, else the map's maximum. Returns boxes [N, 4] float (x, y, w, h) in
    pixels -- pixel i covers [i, i + 1) -- and peaks [N, 2] (row, col) of each map's maximum (first in
    raster order). A flat map has no evidence: its box is the whole map and its peak (-1, -1).
    """
    normalised, flat = normalise_maps(maps)
    count, height, width = normalised.shape
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (count,))
    foreground = normalised >= thresholds[:, None, None]
    flat_index = normalised.reshape(count, -1).argmax(axis=1)
    peaks = np.stack([flat_index // width, flat_index % width], axis=1)
    starts = peaks.copy()
    if seeds is not None:
        seeds = np.clip(np.asarray(seeds, dtype=np.int64), 0, [height - 1, width - 1])
        usable = foreground[np.arange(count), seeds[:, 0], seeds[:, 1]]
        starts[usable] = seeds[usable]
    boxes = np.tile(np.array([0.0, 0.0, width, height]), (count, 1))
    # Connected-component labelling is sequential within an image; cv2 does it in C, one call per map.
    for index in np.flatnonzero(~flat):
        _, labels, stats, _ = cv2.connectedComponentsWithStats(foreground[index].astype(np.uint8), connectivity=8)
        label = labels[starts[index, 0], starts[index, 1]]
        boxes[index] = stats[label, :4]
    peaks[flat] = -1
    return boxes, peaks


def peak_points(maps: np.ndarray, image_size: int | tuple[int, int], grid: CellGrid | None = None) -> np.ndarray:
    """Where each map points, located on the map at its own resolution: the centre of its highest cell
    (where ``grid`` puts it; without one, the centre of the cell's equal slice of the image), in image
    pixels (y, x) of an image_size frame. [N, h, w] -> [N, 2] float; NaN for a flat map.

    Finding the peak after upsampling would be wrong: bilinear upsampling turns each edge cell into a
    band of equal values, and the first maximum in raster order then sits on pixel row or column 0,
    half a cell away from the cell's centre (a box that holds the cell's centre would miss it).
    Ties between cells at the map's own resolution go to the first in raster order.
    """
    maps = np.asarray(maps, dtype=np.float64)
    count, height, width = maps.shape
    out_height, out_width = (image_size, image_size) if np.isscalar(image_size) else image_size
    _, flat = normalise_maps(maps)
    flat_index = maps.reshape(count, -1).argmax(axis=1)
    points = cell_centre_points(flat_index // width, flat_index % width, (height, width), (out_height, out_width), grid)
    points[flat] = np.nan
    return points


def localise(maps: np.ndarray, image_size: int, threshold: float = 0.5,
             grid: CellGrid | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Evidence maps at feature-map resolution [N, h, w] -> (boxes [N, 4] and points [N, 2] (y, x)) in
    the image_size x image_size frame. The box comes from the bilinearly upsampled map (METHOD.md), the
    point from the map itself (:func:`peak_points`); the box is the component that holds the point."""
    points = peak_points(maps, image_size, grid)
    upsampled = upsample_maps(torch.as_tensor(np.asarray(maps, dtype=np.float64)), (image_size, image_size), grid).numpy()
    seeds = np.floor(np.nan_to_num(points, nan=0.0)).astype(np.int64)
    boxes, _ = maps_to_boxes(upsampled, threshold, seeds=seeds)
    return boxes, points


def high_activation_boxes(maps: np.ndarray, percentile: float = 95.0) -> np.ndarray:
    """METHOD.md's prototype box: pixels at or above the map's ``percentile``, component holding the max."""
    normalised, _ = normalise_maps(maps)
    thresholds = np.percentile(normalised.reshape(len(normalised), -1), percentile, axis=1)
    return maps_to_boxes(normalised, np.minimum(thresholds, 1.0))[0]


def box_intersection(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Area shared by boxes [N, 4] and [N, 4] (x, y, w, h) -> [N]."""
    x0 = np.maximum(first[:, 0], second[:, 0])
    y0 = np.maximum(first[:, 1], second[:, 1])
    x1 = np.minimum(first[:, 0] + first[:, 2], second[:, 0] + second[:, 2])
    y1 = np.minimum(first[:, 1] + first[:, 3], second[:, 1] + second[:, 3])
    return np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)


def box_area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2], 0, None) * np.clip(boxes[:, 3], 0, None)


def box_iou(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    intersection = box_intersection(predicted, truth)
    union = box_area(predicted) + box_area(truth) - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def box_iobb(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Intersection over the *predicted* box's area (METHOD.md)."""
    intersection = box_intersection(predicted, truth)
    area = box_area(predicted)
    return np.divide(intersection, area, out=np.zeros_like(intersection), where=area > 0)


def _coordinates(points: np.ndarray) -> np.ndarray:
    """Points (y, x) as float coordinates: integer points are pixel indices (row, col) and move to the
    pixel's centre, a row of -1 (no peak) becomes NaN; float points stay as they are (NaN: no peak)."""
    points = np.asarray(points)
    if not np.issubdtype(points.dtype, np.integer):
        return points.astype(np.float64)
    coordinates = points + 0.5
    coordinates[points[:, 0] < 0] = np.nan
    return coordinates


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Whether point (y, x) lies in box (x, y, w, h). Integer points are pixel indices (row, col), tested
    at the pixel's centre, and -1 never hits; float points are coordinates, and NaN never hits."""
    points = _coordinates(points)
    missing = np.isnan(points).any(axis=1)
    y, x = points[:, 0], points[:, 1]
    with np.errstate(invalid="ignore"):
        inside = (x >= boxes[:, 0]) & (x < boxes[:, 0] + boxes[:, 2]) & (y >= boxes[:, 1]) & (y < boxes[:, 1] + boxes[:, 3])
    return inside & ~missing


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------
@dataclass
class CaseScores:
    """Per case: best IoU and best IoBB over its ground-truth boxes, the pointing-game hit, and the
    peak's offset (y, x) from the centre of the nearest box (NaN for a flat map)."""

    iou: np.ndarray
    iobb: np.ndarray
    hit: np.ndarray
    offset: np.ndarray


def score_cases(predicted: np.ndarray, points: np.ndarray, truth: np.ndarray, case_of_truth: np.ndarray) -> CaseScores:
    """predicted [N, 4] boxes and points [N, 2] (y, x; see :func:`points_in_boxes`) per case; truth [G, 4] boxes, each belonging to case
    ``case_of_truth[g]`` (every case has at least one)."""
    count = len(predicted)
    pairs_predicted = predicted[case_of_truth]
    iou = np.zeros(count)
    iobb = np.zeros(count)
    hit = np.zeros(count, dtype=bool)
    np.maximum.at(iou, case_of_truth, box_iou(pairs_predicted, truth))
    np.maximum.at(iobb, case_of_truth, box_iobb(pairs_predicted, truth))
    np.logical_or.at(hit, case_of_truth, points_in_boxes(points[case_of_truth], truth))
    centres = truth[:, [1, 0]] + truth[:, [3, 2]] / 2  # (y, x) per box
    offsets = _coordinates(points)[case_of_truth] - centres  # [G, 2]
    reach = np.hypot(offsets[:, 0], offsets[:, 1])
    nearest = np.lexsort((np.nan_to_num(reach, nan=np.inf), case_of_truth))  # by case, then by distance
    first = nearest[np.r_[True, case_of_truth[nearest][1:] != case_of_truth[nearest][:-1]][: len(nearest)]]
    offset = np.full((count, 2), np.nan)
    offset[case_of_truth[first]] = offsets[first]
    return CaseScores(iou=iou, iobb=iobb, hit=hit, offset=offset)


def summarise(scores: CaseScores, case_class: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy at each IoU / IoBB threshold, pointing-game hit rate, mean IoU and the median peak
    offset (over the cases whose map has a peak; flat maps are left out), per class (classes with cases
    only), and their unweighted mean over those classes (for the offsets, over the classes that have one)."""
    per_class = {}
    for class_index in np.unique(case_class):
        member = case_class == class_index
        entry = dict(cases=int(member.sum()))
        for t in THRESHOLDS:
            entry[f"iou_{t}"] = float(np.mean(scores.iou[member] >= t))
        for t in THRESHOLDS:
            entry[f"iobb_{t}"] = float(np.mean(scores.iobb[member] >= t))
        entry["pointing"] = float(np.mean(scores.hit[member]))
        entry["mean_iou"] = float(np.mean(scores.iou[member]))
        located = member & ~np.isnan(scores.offset).any(axis=1)
        for axis, key in enumerate(OFFSET_KEYS):
            entry[key] = float(np.median(scores.offset[located, axis])) if located.any() else float("nan")
        per_class[class_names[int(class_index)]] = entry
    mean = {key: (float(np.nanmean([entry[key] for entry in per_class.values()]))
                  if per_class and not all(np.isnan(entry[key]) for entry in per_class.values()) else float("nan"))
            for key in [*SCORE_KEYS, *OFFSET_KEYS]}
    mean["classes"] = len(per_class)
    mean["cases"] = int(len(case_class))
    return dict(per_class=per_class, mean=mean)


# ----------------------------------------------------------------------------------------------
# Maps from the model
# ----------------------------------------------------------------------------------------------
def class_evidence_maps(similarity_maps: Tensor, last_layer_weight: Tensor) -> Tensor:
    """Every class's evidence map, sum_j W_cj S_j(h, w): [N, P, H, W] and W [K, P] -> [N, K, H, W].

    Its maximum over (h, w) is not the logit (the logit takes each prototype's own maximum), but each
    prototype adds its map in the proportion it adds to the logit, so the map shows where the class's
    evidence lies. Off-class weights are zero after a last-layer stage; they count if they are not."""
    return torch.einsum("kp,nphw->nkhw", last_layer_weight.to(similarity_maps.dtype), similarity_maps)


@torch.no_grad()
def cipl_maps(model, images: Tensor, class_indices: Tensor) -> Tensor:
    """Class evidence maps of ``class_indices[i]`` for ``images[i]``, at feature-map resolution: [N, h, w]."""
    output = model(images)
    weight = model.last_layer.weight[class_indices.to(output.similarity_maps.device)]  # [N, P]
    return torch.einsum("np,nphw->nhw", weight.to(output.similarity_maps.dtype), output.similarity_maps)


class DiseaseMarginTarget:
    """Grad-CAM target for one image: l_c - l_NF, the margin that P(c) = sigmoid(l_c - l_NF) depends on."""

    def __init__(self, class_index: int, no_finding_index: int):
        if class_index == no_finding_index:
            raise ValueError("the No Finding class is the reference of every disease margin, not a target")
        self.class_index = class_index
        self.no_finding_index = no_finding_index

    def __call__(self, logits: Tensor) -> Tensor:
        return logits[..., self.class_index] - logits[..., self.no_finding_index]


class _Logits(nn.Module):
    """The CIPL network as pytorch_grad_cam expects it: images in, logits [N, K] out.

    The input is made to require gradients so the target layer's activations do even when the
    parameters are frozen (after a last-layer stage only the last layer trains).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images.detach().requires_grad_(True)).logits


def gradcam_layer(model, name: str = "backbone") -> nn.Module:
    """``backbone``: the last convolutional block (standard Grad-CAM); ``add_on``: the feature map z."""
    if name not in GRADCAM_LAYERS:
        raise ValueError(f"unknown Grad-CAM layer {name!r}; choose one of {', '.join(GRADCAM_LAYERS)}")
    return model.backbone if name == "backbone" else model.add_on


class _LayerResolutionGradCAM(GradCAM):
    """pytorch_grad_cam's GradCAM, returning each map at its target layer's own resolution.

    The package resizes maps to the input image; the evaluation here upsamples them itself and finds
    the peak at the map's own resolution (:func:`peak_points`), the same as for CIPL's maps.
    """

    def get_target_width_height(self, input_tensor: Tensor) -> tuple[int, int]:
        activations = self.activations_and_grads.activations[0]
        return activations.shape[-1], activations.shape[-2]


def gradcam_maps(model, images: Tensor, class_indices: Tensor, layer: str = "backbone") -> Tensor:
    """Grad-CAM (pytorch_grad_cam.GradCAM) of the margin l_c - l_NF for ``class_indices[i]`` on
    ``images[i]``, one backward pass for the batch: [N, h, w] in [0, 1] at the target layer's
    resolution (the package min-max normalises each map).

    The model's parameters are frozen for the call (no .grad is left behind) and its train/eval mode
    and requires_grad flags are restored afterwards.
    """
    was_training = model.training
    flags = [parameter.requires_grad for parameter in model.parameters()]
    model.requires_grad_(False)
    cam = _LayerResolutionGradCAM(model=_Logits(model), target_layers=[gradcam_layer(model, layer)])
    try:
        targets = [DiseaseMarginTarget(int(c), model.no_finding_index) for c in class_indices.tolist()]
        with torch.enable_grad():
            maps = cam(input_tensor=images, targets=targets)
    finally:
        cam.activations_and_grads.release()
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
        model.train(was_training)
    return torch.from_numpy(np.asarray(maps, dtype=np.float32))


# ----------------------------------------------------------------------------------------------
# Evaluation over a dataset's boxed images
# ----------------------------------------------------------------------------------------------
@dataclass
class BoxedCases:
    """Cases of a dataset, ground truth scaled to the model's input frame (image_size x image_size)."""

    image_index: np.ndarray  # [N]
    class_index: np.ndarray  # [N]
    truth: np.ndarray  # [G, 4]
    case_of_truth: np.ndarray  # [G]
    skipped: int = 0  # boxes of No Finding or of unknown classes

    @staticmethod
    def concatenate(parts: list["BoxedCases"]) -> "BoxedCases":
        offsets = np.cumsum([0] + [len(part.image_index) for part in parts[:-1]])
        return BoxedCases(
            image_index=np.concatenate([part.image_index for part in parts]),
            class_index=np.concatenate([part.class_index for part in parts]),
            truth=np.concatenate([part.truth for part in parts]),
            case_of_truth=np.concatenate([part.case_of_truth + offset for part, offset in zip(parts, offsets)]),
            skipped=sum(part.skipped for part in parts),
        )


def boxed_cases(dataset, image_size: int, image_indices: list[int] | None = None,
                shapes: list[tuple[int, int]] | None = None) -> BoxedCases:
    """One case per (image, disease) with boxes, in image order; boxes of No Finding or of unknown
    classes are skipped (and counted). ``shapes`` gives each image's (H, W) of ``load_image``; without
    it each image is read to learn its size."""
    num_diseases = len(dataset.class_names) - 1
    indices = sorted(dataset.boxes) if image_indices is None else list(image_indices)
    image_index, class_index, truth, case_of_truth = [], [], [], []
    skipped = 0
    for position, index in enumerate(indices):
        height, width = shapes[position] if shapes is not None else dataset.load_image(index).shape[:2]
        scale = np.array([image_size / width, image_size / height, image_size / width, image_size / height])
        by_class: dict[int, list] = {}
        for class_id, x, y, w, h in dataset.boxes.get(index, []):
            if not 0 <= int(class_id) < num_diseases:
                skipped += 1
                continue
            by_class.setdefault(int(class_id), []).append(np.array([x, y, w, h], dtype=np.float64) * scale)
        for class_id in sorted(by_class):
            for box in by_class[class_id]:
                truth.append(box)
                case_of_truth.append(len(image_index))
            image_index.append(index)
            class_index.append(class_id)
    return BoxedCases(
        image_index=np.asarray(image_index, dtype=np.int64),
        class_index=np.asarray(class_index, dtype=np.int64),
        truth=np.asarray(truth, dtype=np.float64).reshape(-1, 4),
        case_of_truth=np.asarray(case_of_truth, dtype=np.int64),
        skipped=skipped,
    )


def evaluate_localisation(model, dataset, device, image_size: int, threshold: float = 0.5, batch_size: int = 32,
                          methods: tuple[str, ...] = METHODS, layer: str = "backbone", progress: bool = True) -> dict | None:
    """Localisation scores of every method on the boxed images of ``dataset``; None if it has no boxes.

    Works through the boxed images ``batch_size`` at a time, reading each once; every (image, disease)
    case of a batch is one row of the model batch, so an image with two boxed diseases appears twice.
    """
    if not getattr(dataset, "boxes", None):
        return None
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise ValueError(f"unknown localisation method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"localisation threshold must be in (0, 1], got {threshold}")
    gradcam_layer(model, layer)  # an unknown layer name fails before any work
    transform = EvalTransform(image_size)
    indices = sorted(dataset.boxes)
    was_training = model.training
    model.eval()
    parts: list[BoxedCases] = []
    boxes: dict[str, list] = {method: [] for method in methods}
    points: dict[str, list] = {method: [] for method in methods}
    map_size = (0, 0)
    grid = model.cell_grid(image_size)  # Grad-CAM's layers share the feature map's cells
    starts = range(0, len(indices), batch_size)
    try:
        for start in tqdm(starts, desc="localisation", leave=False, disable=not progress):
            chunk = indices[start : start + batch_size]
            raw = [dataset.load_image(index) for index in chunk]
            cases = boxed_cases(dataset, image_size, chunk, [image.shape[:2] for image in raw])
            parts.append(cases)
            if len(cases.image_index) == 0:
                continue
            slot = {index: position for position, index in enumerate(chunk)}
            tensors = torch.stack([transform(image) for image in raw])
            images = tensors[[slot[int(index)] for index in cases.image_index]].to(device)
            classes = torch.as_tensor(cases.class_index, device=device)
            for method in methods:
                maps = cipl_maps(model, images, classes) if method == "cipl" else gradcam_maps(model, images, classes, layer)
                map_size = tuple(maps.shape[-2:])
                method_boxes, method_points = localise(maps.double().cpu().numpy(), image_size, threshold, grid)
                boxes[method].append(method_boxes)
                points[method].append(method_points)
    finally:
        model.train(was_training)
    cases = BoxedCases.concatenate(parts)
    if cases.skipped:
        logger.warning("localisation: skipped %d boxes of No Finding or of classes the model does not have", cases.skipped)
    if len(cases.image_index) == 0:
        return None
    report = dict(
        threshold=threshold,
        image_size=image_size,
        gradcam_layer=layer,
        boxed_images=int(len(np.unique(cases.image_index))),
        cases=int(len(cases.image_index)),
        map_size=list(map_size),
        methods={},
    )
    for method in methods:
        scores = score_cases(np.concatenate(boxes[method]), np.concatenate(points[method]), cases.truth, cases.case_of_truth)
        report["methods"][method] = summarise(scores, cases.class_index, dataset.class_names)
    share = cells_in_boxes(cases.truth, cases.case_of_truth, len(cases.image_index), map_size, image_size, grid)
    for key, per_case in (("pointing_ceiling", share > 0), ("pointing_random", share)):
        per_class = {dataset.class_names[int(c)]: float(per_case[cases.class_index == c].mean())
                     for c in np.unique(cases.class_index)}
        report[key] = dict(per_class=per_class, mean=float(np.mean(list(per_class.values()))))
    return report


def cells_in_boxes(truth: np.ndarray, case_of_truth: np.ndarray, count: int, map_size: tuple[int, int],
                   image_size: int, grid: CellGrid | None = None) -> np.ndarray:
    """Per case, the share of the h x w map's cell centres (placed by ``grid``, as in
    :func:`peak_points`) that lie in one of its boxes: [count] in [0, 1].

    Two references for the pointing game follow from it: a case is reachable at all when the share is
    above 0 (:func:`pointing_ceiling`), and a map whose peak falls on a uniformly random cell hits a
    case with probability equal to the share (a box smaller than a cell may hold no cell centre)."""
    height, width = map_size
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    centres = cell_centre_points(rows.ravel(), cols.ravel(), map_size, (image_size, image_size), grid)
    inside = points_in_boxes(np.repeat(centres, len(truth), axis=0), np.tile(truth, (len(centres), 1)))
    inside = inside.reshape(len(centres), len(truth))  # [cells, G]
    cell_hits_case = np.zeros((len(centres), count), dtype=bool)
    np.logical_or.at(cell_hits_case, (slice(None), case_of_truth), inside)
    return cell_hits_case.mean(axis=0)


def pointing_ceiling(truth: np.ndarray, case_of_truth: np.ndarray, count: int, map_size: tuple[int, int],
                     image_size: int, grid: CellGrid | None = None) -> np.ndarray:
    """Per case, whether any cell centre of an h x w map lies in one of its boxes: [count] bool. The
    pointing game of any map at that resolution cannot beat the mean of this."""
    return cells_in_boxes(truth, case_of_truth, count, map_size, image_size, grid) > 0


def localisation_report(model, dataset, config, device, progress: bool = True) -> dict | None:
    """evaluate_localisation with the run's settings, logging the table; None (and nothing logged)
    when the split has no boxes."""
    report = evaluate_localisation(
        model, dataset, device, config.image_size, threshold=config.localisation_threshold,
        batch_size=config.eval_batch_size, layer=config.gradcam_layer, progress=progress,
    )
    if report is not None:
        logger.info("weakly-supervised localisation:\n%s", format_table(report))
    return report


def peak_distance(localisation: dict | None, method: str) -> float | None:
    """Mean over classes of how far the class's evidence peaks from its lesions, in pixels: the length
    of the class's median peak offset from the nearest box centre (``peak_offset_y``, ``_x``). Averaging
    lengths, not the signed offsets, keeps classes shifted in opposite directions from cancelling; over
    the twelve full-CIPL runs of docs/proving_ground.md it tracks grounding closely (Spearman -0.94).
    None without a localisation report or offsets."""
    if not localisation:
        return None
    offsets = [(entry.get("peak_offset_y"), entry.get("peak_offset_x"))
               for entry in localisation["methods"].get(method, {}).get("per_class", {}).values()]
    # A class whose maps never peaked has NaN offsets in memory and null ones in results.json.
    lengths = [math.hypot(y, x) for y, x in offsets if y is not None and x is not None and math.isfinite(y) and math.isfinite(x)]
    return float(np.mean(lengths)) if lengths else None


def format_table(report: dict, title: str = "") -> str:
    """The localisation results as a fixed-width text table, one row per method and class plus means."""
    headers = [f"IoU>={t}" for t in THRESHOLDS] + [f"IoBB>={t}" for t in THRESHOLDS] + ["point", "mIoU", "peak dy", "dx"]
    names = sorted({name for result in report["methods"].values() for name in result["per_class"]})
    name_width = max([len(name) for name in names] + [8])
    lines = []
    if title:
        lines.append(title)
    lines.append(f"threshold {report['threshold']}, {report['cases']} cases in {report['boxed_images']} boxed images")
    header = f"{'method':<9} {'class':<{name_width}} {'n':>4} " + " ".join(f"{h:>9}" for h in headers)
    lines += [header, "-" * len(header)]

    def row(method: str, name: str, count, entry: dict) -> str:
        values = " ".join([f"{_number(entry.get(key)):>9}" for key in SCORE_KEYS]
                          + [f"{_offset(entry.get(key)):>9}" for key in OFFSET_KEYS])
        return f"{METHOD_TITLES.get(method, method):<9} {name:<{name_width}} {count:>4} {values}"

    for method, result in report["methods"].items():
        for name in names:
            if name in result["per_class"]:
                entry = result["per_class"][name]
                lines.append(row(method, name, entry["cases"], entry))
        lines.append(row(method, "mean", result["mean"].get("cases", ""), result["mean"]))
        lines.append("")
    ceiling = report.get("pointing_ceiling")
    if ceiling:
        classes = ", ".join(f"{name} {value:.2f}" for name, value in sorted(ceiling["per_class"].items()))
        lines.append(f"pointing ceiling of a {'x'.join(str(v) for v in report.get('map_size', []))} map "
                     f"(a cell centre inside a box): mean {ceiling['mean']:.3f} ({classes})")
    random_cell = report.get("pointing_random")
    if random_cell:
        lines.append(f"pointing game of a uniformly random cell: mean {random_cell['mean']:.3f}")
    distances = {method: peak_distance(report, method) for method in report["methods"]}
    if any(value is not None for value in distances.values()):
        lines.append("evidence peak's distance from its lesion (length of each class's peak dy, dx, mean over classes): "
                     + ", ".join(f"{METHOD_TITLES.get(method, method)} {value:.1f} px"
                                 for method, value in distances.items() if value is not None))
    lines.append("peak dy, dx: median pixels from the nearest box centre to the map's peak (y down, x right); "
                 "the same sign in every class is a shift of the evidence, not of a lesion")
    return "\n".join(lines).rstrip()


def _offset(value) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:+.1f}"


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    """Print the localisation table of each results.json (or run directory) given."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.localisation",
        description="Print the weakly-supervised localisation table(s) stored in results.json "
                    "(main.py writes them when the test split has boxes). Give several runs to compare them.",
    )
    parser.add_argument("results", nargs="+", help="results.json files or run directories")
    args = parser.parse_args(argv)
    tables = []
    for given in args.results:
        path = Path(given)
        if path.is_dir():
            path = path / "results.json"
        try:
            results = json.loads(path.read_text())
        except FileNotFoundError:
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            print(f"error: {path} is not a JSON results file ({error})", file=sys.stderr)
            return 2
        if not isinstance(results, dict) or not results.get("localisation"):
            print(f"error: {path} holds no localisation results (the test split had no boxes, or the run "
                  f"predates localisation: rerun main.py --eval-only)", file=sys.stderr)
            return 2
        tables.append(format_table(results["localisation"], title=f"== {path}"))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
