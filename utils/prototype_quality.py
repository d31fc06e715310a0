"""Prototype quality: do the prototypes mean something? (METHOD.md, "Decisions": reported next to AUC.)

A model can score a good AUC while its explanation is worthless: every prototype pushed onto the same
corner cell, or every prototype matching every image equally. Three figures catch that, per class and
overall:

* **diversity** -- distinct source images and distinct feature-map locations among a class's pushed
  prototypes. A class *collapses* when one location or one source image holds more than a quarter of
  its prototypes (and at least two of them): its prototypes are copies of one patch, not a vocabulary.
* **grounding** -- the share of disease prototypes whose high-activation box on their own source image
  (95th percentile of the upsampled similarity map, connected component of the maximum; the box the
  galleries draw) overlaps a ground-truth box of the prototype's class with IoBB >= 0.5. Only where the
  training split has boxes; prototypes whose source image has no box of their class are not counted.
  ``at_lesion`` is the companion for small lesions: the pushed feature-map cell's centre lies inside
  such a box. ``on_other_lesion``: it lies instead on a box of another disease in the same image, a
  prototype that learnt a companion disease, which CIPL's cross-image term exists to prevent.
  ``reachable`` is a heuristic for how much of the figure is attainable: the share whose lesion box is
  at least half the size of the high-activation region (the 95th percentile covers 5% of the image).
  The box is drawn around the connected part that holds the maximum, which can be smaller than 5%,
  but on a smooth map it rarely is, so a lesion below that size (a single nodule, a thin band) is
  seldom grounded by any model. It is necessary, not sufficient: the box is usually larger than 5%.
  ``centre_cell_grounded`` measures instead what the model's features allow: for every lesion box of
  the split, whether a prototype copied from the lesion's centre cell would be grounded (scored
  against that box alone, where ``grounded`` takes the best of the source image's boxes of the class). A run that
  grounds far fewer of its prototypes than that has features that single out the lesions; it is where
  training left the prototypes, and so where the push put them, that misses.
* **selectivity** -- per prototype, its mean score max_hw exp(-d/D) on images *with* its class minus on
  images *without* it. A prototype that fires on everything scores ~0.

Everything here is batched array code; the functions take plain arrays so each can be checked on a
hand-built example (tests/test_prototype_quality.py).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from datasets import EvalTransform
from model import paired_similarity_maps
from utils.localisation import box_iobb, cell_centre_points, high_activation_boxes, points_in_boxes, upsample_maps

logger = logging.getLogger(__name__)

COLLAPSE_SHARE = 0.25  # more than this share of a class's prototypes on one location or image
GROUNDING_IOBB = 0.5
HIGH_ACTIVATION_SHARE = 0.05  # the 95th-percentile region covers 5% of the image
# A disease prototype whose selectivity is below this matches images with and without its class alike.
# In six of the twelve 2400-anchor synthetic runs of docs/proving_ground.md the disease prototypes fall
# into two groups: those that score close to 1 on every test image, selectivity -0.004 to 0.031, and
# the rest, 0.064 and up.
UNSELECTIVE_BELOW = 0.05


# ----------------------------------------------------------------------------------------------
# Diversity and collapse
# ----------------------------------------------------------------------------------------------
def _largest_group(class_of: np.ndarray, key: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: number of distinct keys, size of the largest group of equal keys, and that key's index
    into ``key`` (first member; -1 for a class without members). ``key`` is [n] or [n, d]."""
    if len(class_of) == 0:
        return np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64), np.full(num_classes, -1, np.int64)
    rows = np.column_stack([class_of, key.reshape(len(class_of), -1)])
    unique, first, counts = np.unique(rows, axis=0, return_index=True, return_counts=True)
    distinct = np.bincount(unique[:, 0], minlength=num_classes)
    largest = np.zeros(num_classes, np.int64)
    np.maximum.at(largest, unique[:, 0], counts)
    # The first group (in sorted order) that reaches the class's largest size names the collapse site.
    is_largest = counts == largest[unique[:, 0]]
    site = np.full(num_classes, -1, np.int64)
    order = np.flatnonzero(is_largest)[::-1]  # reversed, so the first such group is written last
    site[unique[order, 0]] = first[order]
    return distinct, largest, site


def _prototype_of(site: np.ndarray, pushed: np.ndarray) -> np.ndarray:
    """Positions among the pushed prototypes -> prototype indices (-1 stays -1)."""
    if len(pushed) == 0:
        return site
    return np.where(site >= 0, pushed[np.maximum(site, 0)], -1)


def prototype_diversity(prototype_class: np.ndarray, source_index: np.ndarray, source_location: np.ndarray,
                        num_classes: int) -> dict[str, np.ndarray]:
    """Per class (arrays [K]): pushed prototypes, distinct source images and locations, the largest
    number on one image / one location, the shares they make, and whether the class collapsed.

    prototype_class [P] int, source_index [P] int (-1 = not pushed), source_location [P, 2] (row, col).
    ``location_site`` / ``image_site`` give a prototype index on the most crowded location / image.
    """
    prototype_class = np.asarray(prototype_class, np.int64)
    source_index = np.asarray(source_index, np.int64)
    source_location = np.asarray(source_location, np.int64).reshape(-1, 2)
    pushed = np.flatnonzero(source_index >= 0)
    classes = prototype_class[pushed]
    count = np.bincount(classes, minlength=num_classes)
    images, on_one_image, image_site = _largest_group(classes, source_index[pushed], num_classes)
    locations, on_one_location, location_site = _largest_group(classes, source_location[pushed], num_classes)
    safe = np.maximum(count, 1)
    image_share = on_one_image / safe
    location_share = on_one_location / safe

    def collapsed(largest: np.ndarray, share: np.ndarray) -> np.ndarray:
        return (largest >= 2) & (share > COLLAPSE_SHARE)

    return dict(
        prototypes=count,
        distinct_images=images,
        distinct_locations=locations,
        most_on_one_image=on_one_image,
        most_on_one_location=on_one_location,
        largest_image_share=image_share,
        largest_location_share=location_share,
        image_collapsed=collapsed(on_one_image, image_share),
        location_collapsed=collapsed(on_one_location, location_share),
        image_site=_prototype_of(image_site, pushed),
        location_site=_prototype_of(location_site, pushed),
    )


def collapse_message(diversity: dict[str, np.ndarray], class_names: list[str], source_location: np.ndarray,
                     image_ids: list[str] | None, source_index: np.ndarray, prototype_class: np.ndarray | None = None,
                     grounding: dict[str, np.ndarray] | None = None) -> str | None:
    """One line naming every collapsed class and where its prototypes pile up; None if none did.

    With ``grounding`` (:func:`prototype_grounding`) and ``prototype_class``, a cell's pile-up also says
    how many of its prototypes lie inside a box of their class in their own source image: a lesion that
    sits at the same place in most images (the heart) piles up on its own cells without copying anything.
    """
    parts = []
    for class_index in np.flatnonzero(diversity["location_collapsed"] | diversity["image_collapsed"]):
        total = int(diversity["prototypes"][class_index])
        details = []
        if diversity["location_collapsed"][class_index]:
            row, col = (int(v) for v in source_location[diversity["location_site"][class_index]])
            piled = int(diversity["most_on_one_location"][class_index])
            detail = f"{piled} of {total} on feature-map cell ({row}, {col})"
            if grounding is not None and prototype_class is not None:
                on_cell = ((prototype_class == class_index) & (source_index >= 0)
                           & (source_location == (row, col)).all(axis=1))
                with_box = int((grounding["evaluable"] & on_cell).sum())
                inside = int((grounding["evaluable"] & grounding["at_lesion"] & on_cell).sum())
                name = class_names[class_index]
                if with_box == piled:
                    detail += f", {inside} of those {piled} inside a {name} box of their own image"
                elif with_box:
                    detail += f", {inside} of the {with_box} of those whose image has a {name} box inside one"
            details.append(detail)
        if diversity["image_collapsed"][class_index]:
            index = int(source_index[diversity["image_site"][class_index]])
            name = image_ids[index] if image_ids is not None else f"training image {index}"
            details.append(f"{int(diversity['most_on_one_image'][class_index])} of {total} on {name}")
        parts.append(f"{class_names[class_index]} ({', '.join(details)})")
    if not parts:
        return None
    return (f"prototypes collapsed in {len(parts)} of {len(class_names)} classes: " + "; ".join(parts)
            + ". They pile onto one feature-map position or one source image instead of covering the class, "
            "unless the disease itself lies there in most images (read its gallery); see README 'Prototype quality'.")


# ----------------------------------------------------------------------------------------------
# Selectivity
# ----------------------------------------------------------------------------------------------
def prototype_selectivity(scores: np.ndarray, targets: np.ndarray, prototype_class: np.ndarray) -> np.ndarray:
    """Per prototype: mean score on images of its class minus mean score on the other images.

    scores [N, P] (max similarity of each prototype on each image), targets [N, K] multi-hot,
    prototype_class [P] -> [P]; NaN where the images include no positive or no negative of the class.
    """
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(targets)[:, np.asarray(prototype_class, np.int64)] > 0.5  # [N, P]
    negative = ~positive
    positives, negatives = positive.sum(axis=0), negative.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        on_positive = (scores * positive).sum(axis=0) / positives
        on_negative = (scores * negative).sum(axis=0) / negatives
    return np.where((positives > 0) & (negatives > 0), on_positive - on_negative, np.nan)


def unselective_prototypes(selectivity: np.ndarray, prototype_class: np.ndarray, no_finding_index: int) -> np.ndarray:
    """[P] bool: the disease prototypes whose selectivity is below UNSELECTIVE_BELOW (NaN is not flagged).
    No Finding's prototypes are left out: the reference head's score is meant to be high everywhere."""
    return (np.asarray(selectivity, np.float64) < UNSELECTIVE_BELOW) & (np.asarray(prototype_class) != no_finding_index)


def unselective_message(selectivity: np.ndarray, prototype_class: np.ndarray, class_names: list[str],
                        no_finding_index: int) -> str | None:
    """One line naming, per disease class, the :func:`unselective_prototypes`; None if there are none."""
    selectivity = np.asarray(selectivity, np.float64)
    prototype_class = np.asarray(prototype_class)
    flagged = unselective_prototypes(selectivity, prototype_class, no_finding_index)
    if not flagged.any():
        return None
    disease_count = int(np.isfinite(selectivity[prototype_class != no_finding_index]).sum())
    parts = [f"{class_names[c]} {', '.join(str(j) for j in np.flatnonzero(flagged & (prototype_class == c)))}"
             for c in np.unique(prototype_class[flagged])]
    return (f"{int(flagged.sum())} of {disease_count} disease prototypes match images with and without their class "
            f"alike (selectivity < {UNSELECTIVE_BELOW:g}; by class, prototype numbers): {'; '.join(parts)}. "
            "They add about the same to every image's logit and explain nothing; see README 'Prototype quality'.")


# ----------------------------------------------------------------------------------------------
# Grounding
# ----------------------------------------------------------------------------------------------
def grounding_scores(boxes: np.ndarray, points: np.ndarray, truth: np.ndarray, owner: np.ndarray,
                     count: int) -> tuple[np.ndarray, np.ndarray]:
    """Best IoBB of each prototype's high-activation box over the truth boxes it owns, and whether its
    pushed cell centre falls in any of them.

    boxes [n, 4] (x, y, w, h), points [n, 2] (y, x), truth [G, 4], owner [G] in 0..n-1 -> ([n], [n] bool);
    a prototype owning no truth box gets IoBB 0 and False.
    """
    best = np.zeros(count)
    if len(truth):
        np.maximum.at(best, owner, box_iobb(boxes[owner], truth))
    return best, points_in_owned_boxes(points, truth, owner, count)


def points_in_owned_boxes(points: np.ndarray, truth: np.ndarray, owner: np.ndarray, count: int) -> np.ndarray:
    """Whether each prototype's point (y, x) falls in any of the boxes it owns.

    points [n, 2], truth [G, 4] (x, y, w, h), owner [G] in 0..n-1 -> [n] bool (False where it owns none).
    """
    inside = np.zeros(count, dtype=bool)
    if len(truth):
        np.logical_or.at(inside, owner, points_in_boxes(points[owner], truth))
    return inside


@torch.no_grad()
def image_features(model, dataset, indices, image_size: int, device) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The network's features [len(indices), D, h, w] of the dataset's images ``indices`` (deterministic
    resize, eval mode, the model's mode restored afterwards) and the images as read, at their own size."""
    raw = [dataset.load_image(int(index)) for index in indices]
    transform = EvalTransform(image_size)
    was_training = model.training
    model.eval()
    try:
        features = model.extract_features(torch.stack([transform(image) for image in raw]).to(device))
    finally:
        model.train(was_training)
    return features, raw


def in_model_frame(boxes: np.ndarray, sizes, image_size: int) -> np.ndarray:
    """Boxes [n, 4] (x, y, w, h) in the pixels of their own images, of (height, width) ``sizes`` [n],
    -> the same boxes in the image_size x image_size frame where the maps live."""
    height, width = np.asarray(sizes, np.float64).reshape(-1, 2).T
    return np.asarray(boxes, np.float64).reshape(-1, 4) * (image_size / np.stack([width, height, width, height], axis=1))


@torch.no_grad()
def source_similarity_maps(model, dataset, prototypes: np.ndarray, image_size: int, device,
                           batch_size: int = 32) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Each prototype's similarity map exp(-d/D) on its own source image, at feature-map resolution
    [len(prototypes), h, w] (float64), and that image's own (height, width). Each source image is
    read and run through the network once."""
    source = model.prototype_source_index.cpu().numpy()[prototypes]
    unique, inverse = np.unique(source, return_inverse=True)
    features, sizes = [], []
    for start in range(0, len(unique), batch_size):
        batch_features, raw = image_features(model, dataset, unique[start : start + batch_size], image_size, device)
        features.append(batch_features)
        sizes.extend(image.shape[:2] for image in raw)
    own = torch.cat(features)[torch.as_tensor(inverse, device=device)]  # [q, D, h, w]
    vectors = model.prototypes.detach()[torch.as_tensor(prototypes, device=device)]  # [q, D]
    return paired_similarity_maps(own, vectors, model.prototype_dim), [sizes[i] for i in inverse]


def prototype_grounding(model, dataset, image_size: int, device, batch_size: int = 32) -> dict[str, np.ndarray] | None:
    """Grounding of every pushed disease prototype whose source image has a box of its class.

    Returns arrays [P]: ``evaluable`` (bool), ``iobb`` (best IoBB, NaN where not evaluable),
    ``grounded`` (IoBB >= 0.5), ``at_lesion`` (pushed cell centre inside a box), ``on_other_lesion``
    (pushed cell centre inside another disease's box of the same image and in none of its own) and
    ``reachable`` (its largest lesion box holds at least half of HIGH_ACTIVATION_SHARE of the image); None when the
    dataset has no boxes at all. Boxes are scaled from the image's own pixels into the model's
    image_size x image_size frame, where the maps live.
    """
    boxes_of = getattr(dataset, "boxes", None) or {}
    if not boxes_of:
        return None
    num_prototypes = model.num_prototypes
    source = model.prototype_source_index.cpu().numpy()
    classes = model.prototype_class.cpu().numpy()
    location = model.prototype_source_location.cpu().numpy()
    disease = (source >= 0) & (classes != model.no_finding_index)
    truth, owner = [], []
    foreign, foreign_owner = [], []  # the other diseases' boxes in the same source images
    chosen = []  # the evaluable disease prototypes, in index order; owner refers to positions in it
    for prototype in np.flatnonzero(disease):  # a few hundred records; gathers boxes, no tensor work
        boxes = boxes_of.get(int(source[prototype]), [])
        own = [box[1:] for box in boxes if int(box[0]) == classes[prototype]]
        if own:
            truth.extend(own)
            owner.extend([len(chosen)] * len(own))
            others = [box[1:] for box in boxes if int(box[0]) != classes[prototype]]
            foreign.extend(others)
            foreign_owner.extend([len(chosen)] * len(others))
            chosen.append(prototype)
    result = dict(evaluable=np.zeros(num_prototypes, bool), iobb=np.full(num_prototypes, np.nan),
                  reachable=np.zeros(num_prototypes, bool), grounded=np.zeros(num_prototypes, bool),
                  at_lesion=np.zeros(num_prototypes, bool), on_other_lesion=np.zeros(num_prototypes, bool))
    if not chosen:
        return result
    chosen = np.asarray(chosen, np.int64)
    owner = np.asarray(owner, np.int64)
    high_boxes, sizes = [], []
    grid = model.cell_grid(image_size)
    for start in range(0, len(chosen), batch_size):  # bounded memory: batch_size upsampled maps at a time
        maps, chunk_sizes = source_similarity_maps(model, dataset, chosen[start : start + batch_size], image_size,
                                                   device, batch_size)
        high_boxes.append(high_activation_boxes(upsample_maps(maps, (image_size, image_size), grid).cpu().numpy()))
        sizes.extend(chunk_sizes)
    # The truth boxes, from their image's own pixels (sizes: per evaluable prototype) into the maps' frame.
    sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
    truth = in_model_frame(truth, sizes[owner], image_size)
    foreign_owner = np.asarray(foreign_owner, np.int64)
    foreign = in_model_frame(foreign, sizes[foreign_owner], image_size)
    largest_lesion = np.zeros(len(chosen))
    np.maximum.at(largest_lesion, owner, truth[:, 2] * truth[:, 3])

    rows, cols = location[chosen].T
    points = cell_centre_points(rows, cols, maps.shape[-2:], (image_size, image_size), grid)
    iobb, inside = grounding_scores(np.concatenate(high_boxes), points, truth, owner, len(chosen))
    in_foreign = points_in_owned_boxes(points, foreign, foreign_owner, len(chosen))
    result["evaluable"][chosen] = True
    result["iobb"][chosen] = iobb
    result["grounded"][chosen] = iobb >= GROUNDING_IOBB
    result["at_lesion"][chosen] = inside
    result["on_other_lesion"][chosen] = in_foreign & ~inside
    result["reachable"][chosen] = largest_lesion >= GROUNDING_IOBB * HIGH_ACTIVATION_SHARE * image_size**2
    return result


def centre_cell_iobb(features: torch.Tensor, truth: np.ndarray, image_of_truth: np.ndarray, grid,
                     prototype_dim: int) -> np.ndarray:
    """For each lesion box, the IoBB that a prototype copied from the cell nearest the box's centre
    would score: that cell's feature as the prototype, its similarity map on the same image, the
    high-activation box of it (as :func:`prototype_grounding` draws it), IoBB with the lesion box.

    features [n, D, h, w] of n images, truth [G, 4] (x, y, w, h) in the grid's frame, image_of_truth
    [G] in 0..n-1, grid the model's :class:`~model.CellGrid` -> [G]. Which cell is nearest is read off
    the grid: cell k of an axis is centred at ``grid.first + k * grid.step`` pixels; a centre halfway
    between two cells takes the later one.
    """
    height, width = features.shape[-2:]
    truth = np.asarray(truth, np.float64).reshape(-1, 4)
    if not len(truth):
        return np.zeros(0)
    centre_y, centre_x = truth[:, 1] + truth[:, 3] / 2, truth[:, 0] + truth[:, 2] / 2
    rows = np.clip(np.floor((centre_y - grid.first) / grid.step + 0.5), 0, height - 1).astype(np.int64)
    cols = np.clip(np.floor((centre_x - grid.first) / grid.step + 0.5), 0, width - 1).astype(np.int64)
    images = torch.as_tensor(np.asarray(image_of_truth, np.int64), device=features.device)
    own = features[images]  # [G, D, h, w]
    prototypes = own[torch.arange(len(truth), device=features.device), :, torch.as_tensor(rows), torch.as_tensor(cols)]
    maps = paired_similarity_maps(own, prototypes, prototype_dim)
    boxes = high_activation_boxes(upsample_maps(maps, (grid.frame, grid.frame), grid).cpu().numpy())
    return box_iobb(boxes, truth)


@torch.no_grad()
def centre_cell_grounding(model, dataset, image_size: int, device, batch_size: int = 32) -> dict[str, np.ndarray] | None:
    """How much of the grounding figure the model's *features* allow: for every lesion box of the split
    (each box of each disease in each image), whether a prototype copied from the lesion's centre cell
    would be grounded (:func:`centre_cell_iobb` >= 0.5).

    Returns per class (arrays [K]) ``lesions`` (boxes counted) and ``grounded`` (share; NaN without
    lesions); None when the dataset has no boxes. A run whose prototypes ground far less than this has
    features that separate the lesions well enough; it is where the prototypes were placed that fails.
    """
    boxes_of = getattr(dataset, "boxes", None) or {}
    if not boxes_of:
        return None
    grid = model.cell_grid(image_size)
    hits = np.zeros(model.num_classes)
    lesions = np.zeros(model.num_classes)
    images = sorted(boxes_of)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        features, raw = image_features(model, dataset, chunk, image_size, device)
        records = [(slot, box) for slot, index in enumerate(chunk) for box in boxes_of[index]]
        slots = np.array([slot for slot, _ in records], np.int64)
        classes = np.array([int(box[0]) for _, box in records], np.int64)
        truth = in_model_frame([box[1:] for _, box in records], [raw[slot].shape[:2] for slot in slots], image_size)
        grounded = centre_cell_iobb(features, truth, slots, grid, model.prototype_dim) >= GROUNDING_IOBB
        np.add.at(hits, classes, grounded)
        np.add.at(lesions, classes, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(lesions > 0, hits / np.maximum(lesions, 1), np.nan)
    return dict(lesions=lesions.astype(np.int64), grounded=share)


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def _mean_or_none(values: np.ndarray) -> float | None:
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


# report key -> prototype_grounding array whose share among the evaluable prototypes it gives
GROUNDING_SHARES = (("grounded", "grounded"), ("at_lesion", "at_lesion"), ("on_other_lesion", "on_other_lesion"),
                    ("grounding_reachable", "reachable"))


def _grounding_shares(grounding: dict[str, np.ndarray], evaluable: np.ndarray) -> dict[str, float | None]:
    """Each grounding share among the `evaluable` prototypes (None where there are none)."""
    return {name: _mean_or_none(grounding[key][evaluable]) for name, key in GROUNDING_SHARES}


def quality_report(model, diversity: dict, grounding: dict | None, selectivity: np.ndarray | None,
                   centre_grounding: dict | None = None) -> dict:
    """The ``prototypes`` section of results.json / prototypes.json: per class and overall.
    ``centre_grounding`` (:func:`centre_cell_grounding`) adds ``centre_cell_grounded``: per class, and
    overall as the mean over the disease classes that have lesions."""
    classes = model.prototype_class.cpu().numpy()
    disease = classes != model.no_finding_index
    unselective = None if selectivity is None else unselective_prototypes(selectivity, classes, model.no_finding_index)
    per_class = {}
    for class_index, name in enumerate(model.class_names):
        members = classes == class_index
        entry = dict(
            prototypes=int(diversity["prototypes"][class_index]),
            distinct_images=int(diversity["distinct_images"][class_index]),
            distinct_locations=int(diversity["distinct_locations"][class_index]),
            largest_location_share=float(diversity["largest_location_share"][class_index]),
            largest_image_share=float(diversity["largest_image_share"][class_index]),
            collapsed=bool(diversity["location_collapsed"][class_index] or diversity["image_collapsed"][class_index]),
        )
        if grounding is not None and class_index != model.no_finding_index:
            evaluable = members & grounding["evaluable"]
            entry["grounding_evaluable"] = int(evaluable.sum())
            entry.update(_grounding_shares(grounding, evaluable))
            entry["mean_iobb"] = _mean_or_none(grounding["iobb"][evaluable])
        if centre_grounding is not None and class_index != model.no_finding_index:
            entry["centre_cell_lesions"] = int(centre_grounding["lesions"][class_index])
            entry["centre_cell_grounded"] = _mean_or_none(centre_grounding["grounded"][class_index : class_index + 1])
        if selectivity is not None:
            entry["selectivity"] = _mean_or_none(selectivity[members])
            if class_index != model.no_finding_index:
                entry["unselective"] = int(unselective[members].sum())
        per_class[name] = entry
    pushed = int(diversity["prototypes"].sum())
    source = model.prototype_source_index.cpu().numpy()
    location = model.prototype_source_location.cpu().numpy()[source >= 0]
    overall = dict(
        prototypes=int(len(classes)),
        pushed=pushed,
        distinct_images=int(len(np.unique(source[source >= 0]))),
        distinct_locations=int(len(np.unique(location.reshape(-1, 2), axis=0))),
        collapsed_classes=[name for name, entry in per_class.items() if entry["collapsed"]],
        largest_location_share=float(diversity["largest_location_share"].max()) if pushed else None,
        largest_image_share=float(diversity["largest_image_share"].max()) if pushed else None,
        mean_distinct_locations_share=_mean_or_none(
            diversity["distinct_locations"][diversity["prototypes"] > 0] / diversity["prototypes"][diversity["prototypes"] > 0]),
    )
    if grounding is not None:
        evaluable = disease & grounding["evaluable"]
        overall["grounding_evaluable"] = int(evaluable.sum())
        overall.update(_grounding_shares(grounding, evaluable))
    if centre_grounding is not None:
        diseases = np.arange(model.num_classes) != model.no_finding_index
        overall["centre_cell_grounded"] = _mean_or_none(centre_grounding["grounded"][diseases])
    if selectivity is not None:
        overall["selectivity"] = _mean_or_none(selectivity[disease])
        overall["selectivity_no_finding"] = _mean_or_none(selectivity[~disease])
        overall["unselective_prototypes"] = np.flatnonzero(unselective).tolist()
    return dict(per_class=per_class, overall=overall)


def model_diversity(model) -> dict[str, np.ndarray]:
    return prototype_diversity(model.prototype_class.cpu().numpy(), model.prototype_source_index.cpu().numpy(),
                               model.prototype_source_location.cpu().numpy(), model.num_classes)


def warn_if_collapsed(model, image_ids: list[str] | None = None,
                      grounding: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """After a push: log one warning line naming every collapsed class (with ``grounding``, also how many
    of a crowded cell's prototypes lie on a lesion of their class); returns the diversity arrays."""
    diversity = model_diversity(model)
    message = collapse_message(diversity, model.class_names, model.prototype_source_location.cpu().numpy(),
                               image_ids, model.prototype_source_index.cpu().numpy(),
                               model.prototype_class.cpu().numpy(), grounding)
    if message:
        logger.warning("%s", message)
    return diversity


def evaluate_prototype_quality(model, train, image_size: int, device, batch_size: int = 32,
                               test_scores: np.ndarray | None = None, test_targets: np.ndarray | None = None,
                               grounding: dict[str, np.ndarray] | None = None,
                               provenance: list[dict] | None = None) -> dict:
    """The whole ``prototypes`` section: diversity and grounding from the training split the prototypes
    were pushed onto, selectivity from held-out images' scores [N, P] and targets [N, K] when given (and
    then a warning line naming the disease prototypes that match every image alike). ``grounding``, when
    the caller has already computed it for this model (:func:`prototype_grounding`), is used as is.
    With the push's ``provenance`` from a push under the cell cap, per class and overall also
    ``moved_by_cell_cap``: how many prototypes the cap moved off a full cell."""
    diversity = model_diversity(model)
    if grounding is None:
        grounding = prototype_grounding(model, train, image_size, device, batch_size)
    centre_grounding = centre_cell_grounding(model, train, image_size, device, batch_size)
    selectivity = None
    if test_scores is not None and test_targets is not None:
        classes = model.prototype_class.cpu().numpy()
        selectivity = prototype_selectivity(test_scores, test_targets, classes)
        message = unselective_message(selectivity, classes, model.class_names, model.no_finding_index)
        if message:
            logger.warning("%s", message)
    report = quality_report(model, diversity, grounding, selectivity, centre_grounding)
    if provenance and all("moved_by_cell_cap" in record for record in provenance):
        moved = np.array([record["moved_by_cell_cap"] for record in provenance], dtype=bool)
        classes = model.prototype_class.cpu().numpy()
        for class_index, (name, entry) in enumerate(report["per_class"].items()):
            entry["moved_by_cell_cap"] = int(moved[classes == class_index].sum())
        report["overall"]["moved_by_cell_cap"] = int(moved.sum())
    return report


def quality_scalars(report: dict) -> dict[str, float]:
    """The report as flat scalars for TensorBoard: overall figures, then per-class ones under their name."""
    scalars = {key: float(value) for key, value in report["overall"].items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    scalars["collapsed_classes"] = float(len(report["overall"]["collapsed_classes"]))
    if report["overall"].get("unselective_prototypes") is not None:
        scalars["unselective_prototypes"] = float(len(report["overall"]["unselective_prototypes"]))
    for name, entry in report["per_class"].items():
        for key in ("distinct_locations", "largest_location_share", "grounded", "centre_cell_grounded", "at_lesion",
                    "on_other_lesion", "selectivity"):
            if entry.get(key) is not None:
                scalars[f"{key}/{name}"] = float(entry[key])
    return scalars


def format_quality(report: dict) -> str:
    """The prototype-quality figures as a small fixed-width table for the log. ``centre`` is what the
    features allow: the share of the training split's lesions that a prototype copied from the lesion's
    centre cell would ground (:func:`centre_cell_grounding`)."""
    lines = [f"{'class':<16} {'n':>3} {'images':>6} {'cells':>5} {'top cell':>8} {'grounded':>8} {'centre':>6} "
             f"{'reachable':>9} {'at lesion':>9} {'other':>6} {'select':>7}"]

    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    for name, entry in report["per_class"].items():
        lines.append(f"{name[:16]:<16} {entry['prototypes']:>3} {entry['distinct_images']:>6} {entry['distinct_locations']:>5} "
                     f"{entry['largest_location_share']:>8.2f} {number(entry.get('grounded')):>8} "
                     f"{number(entry.get('centre_cell_grounded'), 2):>6} "
                     f"{number(entry.get('grounding_reachable')):>9} {number(entry.get('at_lesion')):>9} "
                     f"{number(entry.get('on_other_lesion')):>6} {number(entry.get('selectivity')):>7}")
    overall = report["overall"]
    flagged = overall.get("unselective_prototypes")
    unselective = "" if flagged is None else f" ({len(flagged)} below {UNSELECTIVE_BELOW:g})"
    centre = ("" if overall.get("centre_cell_grounded") is None
              else f"; on each lesion's centre cell {number(overall['centre_cell_grounded'])}")
    lines.append(f"overall: grounded {number(overall.get('grounded'))} (reachable {number(overall.get('grounding_reachable'))}"
                 f"{centre}), at lesion {number(overall.get('at_lesion'))} (on another disease's "
                 f"{number(overall.get('on_other_lesion'))}), selectivity {number(overall.get('selectivity'))}{unselective}, "
                 f"collapsed classes: {', '.join(overall['collapsed_classes']) or 'none'}"
                 + ("" if overall.get("moved_by_cell_cap") is None
                    else f", moved by the push's cell cap: {overall['moved_by_cell_cap']}"))
    return "\n".join(lines)
