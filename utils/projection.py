"""Push (prototype projection) of METHOD.md: ground every prototype on a real training patch.

Two passes over the push set (training images, deterministic resize):

1. *scan*: one batched inference pass. For every prototype we keep only its ``k`` nearest candidate
   images of its own class (distance, image, location), merged batch by batch with a stable sort,
   so memory is O(P x k) whatever the dataset size. ``k = P`` is always enough: prototype j can lose
   at most j candidates to earlier prototypes under the non-repetitive rule. The same pass counts,
   per prototype, the images of its class to which it is the nearest of the class's prototypes. One
   that is nearest to none at the push is not being pulled onto a training patch (L_clst pulls only
   the nearest prototype of each image's classes; L_cls moves it only through its far-off
   similarity), and the push puts it on whichever patch happens to lie nearest. The push warns when
   most of a class's prototypes are such.
2. *select*: prototypes in index order take their nearest candidate whose image no earlier
   prototype took (global across classes); then the features of the chosen images (at most P of
   them) are recomputed and copied into the prototypes.

Not in the paper, off unless ``max_cell_share < 1`` (``--push-max-cell-share``; the synthetic preset
uses 0.25): a *cell cap*. A prototype may not take a feature-map cell that already holds
``max(1, floor(share x M))`` of its class's M prototypes (in any images); it takes its nearest patch on
a cell that is not full instead. Where the cap never binds, the push is METHOD.md's exactly. Where the
plain selection piles more than the cap onto one cell, the classes concerned are scanned again, over
the images of those classes only, with their ``k`` nearest images *per cell* ([P_c, cells, k], float32
distances and int32 images; ``k = P`` is enough for the same reason as above), and the selection is
repeated, until no class is over its cap (:func:`capped_selection`). A prototype whose nearest free
patch, at its turn, lay on a full cell is marked ``moved_by_cell_cap`` in its provenance, with the
squared distance it gave up; the push logs how many moved per class, and how many prototypes in all
sit elsewhere than the paper's push would put them (a moved prototype can take an image a later one
would have taken).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from losses import class_min_distances
from model import squared_distances
from utils.distributed import all_gather_objects, broadcast_tensor, current_context, shard_indices

logger = logging.getLogger(__name__)


@dataclass
class PushCandidates:
    """Per prototype, its nearest candidates sorted by distance along the last dimension: [P, k] (one
    candidate per image, at the image's nearest cell) or, for the cell cap's scan, [P, cells, k] (per
    cell, its nearest images); and its nearest count ([P])."""

    distances: Tensor  # float, inf where there is no candidate
    image_indices: Tensor  # long (int32 in the cell scan), dataset index, -1 where none
    locations: Tensor | None  # long, flat feature-map position h * W + w; None in the cell scan (the row is the cell)
    nearest_counts: Tensor  # long [P]: images of its class to which the prototype is the class's nearest


def empty_candidates(num_prototypes: int, k: int, cells: int | None = None) -> PushCandidates:
    by_image = cells is None
    shape = (num_prototypes, k) if by_image else (num_prototypes, cells, k)
    return PushCandidates(
        distances=torch.full(shape, float("inf")),
        image_indices=torch.full(shape, -1, dtype=torch.long if by_image else torch.int32),
        locations=torch.zeros(shape, dtype=torch.long) if by_image else None,
        nearest_counts=torch.zeros(num_prototypes, dtype=torch.long),
    )


def concatenate_candidates(parts: list[PushCandidates]) -> PushCandidates:
    """Several batches' candidates side by side (unsorted), to be merged in one go."""
    return PushCandidates(torch.cat([part.distances for part in parts], dim=-1),
                          torch.cat([part.image_indices for part in parts], dim=-1),
                          None if parts[0].locations is None else torch.cat([part.locations for part in parts], dim=-1),
                          sum(part.nearest_counts for part in parts))


def merge_candidates(current: PushCandidates, new: PushCandidates, k: int) -> PushCandidates:
    """Keep the k nearest of both, ties to the lower image index (stable and order-independent)."""
    both = concatenate_candidates([current, new])
    distances, image_indices, locations = both.distances, both.image_indices, both.locations
    # Sort by image index first, then stably by distance: equal distances keep image-index order
    # no matter in which order batches (or ranks) arrived.
    missing = image_indices < 0
    by_image = torch.sort(torch.where(missing, torch.iinfo(image_indices.dtype).max, image_indices), dim=-1,
                          stable=True).indices
    distances, image_indices = distances.gather(-1, by_image), image_indices.gather(-1, by_image)
    order = torch.sort(distances, dim=-1, stable=True).indices[..., :k]
    if locations is not None:
        locations = locations.gather(-1, by_image).gather(-1, order)
    return PushCandidates(distances.gather(-1, order), image_indices.gather(-1, order), locations, both.nearest_counts)


@torch.no_grad()
def batch_candidates(model, images: Tensor, targets: Tensor, indices: Tensor) -> PushCandidates:
    """Every (prototype, image) pair of this batch as a candidate: [P, n], inf where the image
    does not carry the prototype's class; and per prototype, the images of the batch with its class
    to which it is the nearest of the class's prototypes."""
    distance_maps = squared_distances(model.extract_features(images), model.prototypes).flatten(2)  # [n, P, HW]
    distances, locations = distance_maps.min(dim=2)  # [n, P] each
    eligible = targets.to(distances.device)[:, model.prototype_class] > 0  # [n, P]
    distances = torch.where(eligible, distances, torch.full_like(distances, float("inf")))
    image_indices = torch.where(eligible, indices.to(distances.device).unsqueeze(1), -1)
    # Per image and class, the smallest distance over the class's prototypes; a prototype at it is
    # the nearest of its class for that image (ties count for each of them).
    class_minimum = class_min_distances(distances, model.prototype_class, model.num_classes)  # [n, K]
    nearest = eligible & (distances == class_minimum[:, model.prototype_class.to(distances.device)])
    return PushCandidates(distances.T.cpu(), image_indices.T.cpu(), locations.T.cpu(), nearest.sum(dim=0).cpu())


def scan_push_set(model, loader: DataLoader, device, k: int, progress: bool = True) -> PushCandidates:
    candidates = empty_candidates(model.num_prototypes, k)
    for batch in tqdm(loader, desc="push: scan", leave=False, disable=not progress):
        new = batch_candidates(model, batch["image"].to(device), batch["target"], batch["index"])
        candidates = merge_candidates(candidates, new, k)
    return candidates


@torch.no_grad()
def batch_cell_candidates(model, images: Tensor, targets: Tensor, indices: Tensor, prototypes: Tensor) -> PushCandidates:
    """For the given prototypes, every (image, cell) of this batch as a candidate: [p, cells, n], inf
    where the image does not carry the prototype's class. The distances are computed as in
    ``batch_candidates`` (against all prototypes, then indexed)."""
    distance_maps = squared_distances(model.extract_features(images), model.prototypes).flatten(2)  # [n, P, HW]
    distance_maps = distance_maps[:, prototypes.to(distance_maps.device)]  # [n, p, HW]
    eligible = targets.to(distance_maps.device)[:, model.prototype_class[prototypes]] > 0  # [n, p]
    distances = torch.where(eligible.unsqueeze(2), distance_maps, torch.full_like(distance_maps, float("inf")))
    image_indices = torch.where(eligible, indices.to(distances.device).unsqueeze(1), -1).to(torch.int32)  # [n, p]
    cells = distances.shape[2]
    return PushCandidates(distances.permute(1, 2, 0).cpu(), image_indices.T.unsqueeze(1).expand(-1, cells, -1).cpu(),
                          None, torch.zeros(len(prototypes), dtype=torch.long))


def scan_cells(model, loader: DataLoader, device, k: int, prototypes: Tensor, cells: int,
               progress: bool = True) -> PushCandidates:
    """The cell cap's scan: for each of ``prototypes``, its k nearest images of its class on every
    cell ([p, cells, k]). Batches are merged about k images at a time, not one by one: the same k
    nearest (the order is total), with a fraction of the sorting."""
    candidates = empty_candidates(len(prototypes), k, cells)
    pending, width = [], 0
    for batch in tqdm(loader, desc="push: scan by cell", leave=False, disable=not progress):
        pending.append(batch_cell_candidates(model, batch["image"].to(device), batch["target"], batch["index"], prototypes))
        width += pending[-1].distances.shape[-1]
        if width >= k:
            candidates, pending, width = merge_candidates(candidates, concatenate_candidates(pending), k), [], 0
    if pending:
        candidates = merge_candidates(candidates, concatenate_candidates(pending), k)
    return candidates


@dataclass
class PushSelection:
    """What the selection gives each prototype ([P] arrays)."""

    image: np.ndarray  # dataset index, -1 where the class has no image
    location: np.ndarray  # flat feature-map position
    distance: np.ndarray
    reused: np.ndarray  # bool: every candidate image was taken, so it reuses one
    moved_by_cell_cap: np.ndarray  # bool: its nearest free patch lay on a full cell
    distance_given_up: np.ndarray  # the cell cap's cost: distance taken minus that of the nearest free patch


def _lexicographic_first(distances: np.ndarray, images: np.ndarray) -> int:
    """Index of the smallest (distance, image, position): ties go to the lower image, then the lower cell."""
    return int(np.lexsort((np.arange(len(distances)), images, distances))[0])


def select_nonrepetitive(candidates: PushCandidates, num_images: int, cell_candidates: dict | None = None,
                         prototype_class: np.ndarray | None = None, cell_cap: np.ndarray | None = None) -> PushSelection:
    """Greedy, in prototype order: each prototype takes its nearest candidate whose image is unused.

    The rule is sequential by definition (prototype j depends on 0..j-1), so this walks the P
    prototypes once over small arrays; a prototype whose candidates are all used falls back to its
    nearest (reused=True), one with no candidate at all gets image -1.

    With the cell cap, ``cell_candidates`` maps each prototype of a capped class to its by-cell
    candidates (numpy distances and images, [cells, k]) and ``cell_cap`` [K] gives each class's cap:
    such a prototype takes, over the cells that hold fewer than the cap of its class, the nearest
    unused image on any of them (ties: lower image, then lower cell).
    """
    distances = candidates.distances.numpy()
    image_indices = candidates.image_indices.numpy()
    locations = candidates.locations.numpy()
    cell_candidates = cell_candidates or {}
    used = np.zeros(num_images + 1, dtype=bool)  # last slot absorbs index -1
    num_prototypes = distances.shape[0]
    selection = PushSelection(
        image=np.full(num_prototypes, -1, dtype=np.int64), location=np.zeros(num_prototypes, dtype=np.int64),
        distance=np.full(num_prototypes, np.inf), reused=np.zeros(num_prototypes, dtype=bool),
        moved_by_cell_cap=np.zeros(num_prototypes, dtype=bool), distance_given_up=np.zeros(num_prototypes))
    cells_taken = None
    if cell_candidates:
        num_cells = next(iter(cell_candidates.values()))[0].shape[0]
        cells_taken = np.zeros((len(cell_cap), num_cells), dtype=np.int64)  # prototypes per (class, cell)
    for prototype in range(num_prototypes):
        if prototype in cell_candidates:
            cell_distances, cell_images = cell_candidates[prototype]
            klass = prototype_class[prototype]
            _select_by_cell(selection, prototype, cell_distances, cell_images, used, cells_taken[klass] < cell_cap[klass])
        else:
            valid = np.isfinite(distances[prototype])
            if not valid.any():
                continue
            free = valid & ~used[image_indices[prototype]]
            slot = int(np.argmax(free)) if free.any() else 0
            selection.reused[prototype] = not free.any()
            selection.image[prototype] = image_indices[prototype, slot]
            selection.location[prototype] = locations[prototype, slot]
            selection.distance[prototype] = distances[prototype, slot]
        if selection.image[prototype] >= 0:
            used[selection.image[prototype]] = True
            if cells_taken is not None:
                cells_taken[prototype_class[prototype], selection.location[prototype]] += 1
    return selection


def _select_by_cell(selection: PushSelection, prototype: int, distances: np.ndarray, images: np.ndarray,
                    used: np.ndarray, open_cells: np.ndarray) -> None:
    """One capped prototype's choice over its [cells, k] candidates (see select_nonrepetitive)."""
    valid = np.isfinite(distances)
    if not valid.any():
        return
    if not open_cells.any():  # more prototypes than cap x cells: the cap cannot hold, so it is dropped
        open_cells = np.ones_like(open_cells)
    free = valid & ~used[images]
    reused = not (free & open_cells[:, None]).any()
    pool = valid if reused else free  # with every image taken, fall back to the nearest, as the plain rule does
    slot = np.argmax(pool, axis=1)  # per cell, its first (nearest) usable candidate
    rows = np.arange(len(distances))
    cell_distance = np.where(pool.any(axis=1), distances[rows, slot], np.inf)
    cell_image = images[rows, slot]
    nearest = _lexicographic_first(cell_distance, cell_image)
    cell = _lexicographic_first(np.where(open_cells, cell_distance, np.inf), cell_image)
    selection.image[prototype] = cell_image[cell]
    selection.location[prototype] = cell
    selection.distance[prototype] = cell_distance[cell]
    selection.reused[prototype] = reused
    selection.moved_by_cell_cap[prototype] = cell != nearest
    selection.distance_given_up[prototype] = cell_distance[cell] - cell_distance[nearest]


def cell_caps(prototype_class: np.ndarray, num_classes: int, max_cell_share: float) -> np.ndarray | None:
    """Per class, the most of its prototypes one cell may hold: floor(share x M), at least 1; None
    when the share is 1 (no cap: METHOD.md's push)."""
    if max_cell_share >= 1.0:
        return None
    per_class = np.bincount(prototype_class, minlength=num_classes)
    return np.array([cell_cap_for(max_cell_share, count) for count in per_class], dtype=np.int64)


def cell_cap_for(max_cell_share: float, prototypes: int) -> int:
    """The most of a class's ``prototypes`` one cell may hold under the cap: floor(share x M), at least 1."""
    return max(1, math.floor(max_cell_share * prototypes + 1e-9))


def classes_over_cap(selection: PushSelection, prototype_class: np.ndarray, cell_cap: np.ndarray) -> list[int]:
    """Classes that have more prototypes on one cell than their cap."""
    pushed = selection.image >= 0
    pairs = np.stack([prototype_class[pushed], selection.location[pushed]], axis=1)
    keys, counts = np.unique(pairs, axis=0, return_counts=True)
    return sorted({int(klass) for (klass, _), count in zip(keys, counts) if count > cell_cap[klass]})


def capped_selection(candidates: PushCandidates, num_images: int, prototype_class: np.ndarray, cell_cap: np.ndarray,
                     scan_by_cell) -> tuple[PushSelection, PushSelection]:
    """The paper's selection, then the cell cap's: while some class not yet capped holds more than its
    cap on one cell, its prototypes get by-cell candidates (``scan_by_cell(prototypes)`` -> numpy
    distances and images [p, cells, k]) and the whole selection is repeated. A class left uncapped is
    at or under its cap at the end, so on each of its turns the plain rule chose an open cell: the
    result is the one with every class capped. Returns (plain selection, capped selection)."""
    plain = selection = select_nonrepetitive(candidates, num_images)
    cell_candidates: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    capped_classes: list[int] = []
    while True:
        over = [klass for klass in classes_over_cap(selection, prototype_class, cell_cap) if klass not in capped_classes]
        if not over:
            return plain, selection
        capped_classes += over
        prototypes = np.flatnonzero(np.isin(prototype_class, over))
        distances, images = scan_by_cell(prototypes)
        for row, prototype in enumerate(prototypes.tolist()):
            cell_candidates[prototype] = (distances[row], images[row])
        selection = select_nonrepetitive(candidates, num_images, cell_candidates, prototype_class, cell_cap)


def warn_if_cap_cannot_hold(prototype_class: np.ndarray, cell_cap: np.ndarray, cells: int, class_names: list[str]) -> None:
    """The cap is dropped for a class with more prototypes than cap x cells (tiny feature maps): say so."""
    per_class = np.bincount(prototype_class, minlength=len(cell_cap))
    too_many = [f"{class_names[klass]} ({per_class[klass]} prototypes, {cells} cells, at most {cell_cap[klass]} each)"
                for klass in range(len(cell_cap)) if per_class[klass] > cell_cap[klass] * cells]
    if too_many:
        logger.warning("the push's cell cap cannot hold for %s: once every cell is full, their remaining prototypes "
                       "take their nearest patch on any cell", ", ".join(too_many))


@torch.no_grad()
def push_prototypes(model, push_dataset, device, batch_size: int = 64, num_workers: int = 0, progress: bool = True,
                    image_ids: list[str] | None = None, max_cell_share: float = 1.0) -> list[dict]:
    """Project every prototype of ``model`` onto its nearest unused training patch of its class.

    push_dataset yields {"image", "target", "index"} with deterministic preprocessing (no
    augmentation). With ``max_cell_share`` below 1, no feature-map cell takes more than
    floor(share x M) of a class's M prototypes (the cell cap; module docstring). Updates
    model.prototypes and the provenance buffers in place and returns the provenance, one dict per
    prototype.
    """
    was_training = model.training
    model.eval()
    # Under torchrun each rank scans its own share and the shares' candidates are merged on every
    # rank in rank order. The k nearest with ties to the lower image index are unique, so the
    # selection is the same as one process scanning everything.
    shard = shard_indices(len(push_dataset))
    loader = DataLoader(Subset(push_dataset, shard), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    k = model.num_prototypes
    candidates = _gathered(scan_push_set(model, loader, device, k, progress), k)
    prototype_class = model.prototype_class.cpu().numpy()
    cap = cell_caps(prototype_class, model.num_classes, max_cell_share)
    if cap is None:
        plain = selection = select_nonrepetitive(candidates, len(push_dataset))
    else:
        cells = int(np.prod(model.extract_features(push_dataset[0]["image"].unsqueeze(0).to(device)).shape[-2:]))
        warn_if_cap_cannot_hold(prototype_class, cap, cells, model.class_names)
        base_targets = getattr(getattr(push_dataset, "base", None), "targets", None)

        def scan_by_cell(prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            # Only images that carry one of these prototypes' classes can be their candidates.
            images = np.arange(len(push_dataset)) if base_targets is None else np.flatnonzero(
                (np.asarray(base_targets)[:, np.unique(prototype_class[prototypes])] > 0).any(axis=1))
            share = images[shard_indices(len(images))]
            subset = DataLoader(Subset(push_dataset, share.tolist()), batch_size=batch_size, shuffle=False,
                                num_workers=num_workers)
            by_cell = _gathered(scan_cells(model, subset, device, k, torch.as_tensor(prototypes), cells, progress), k)
            return by_cell.distances.numpy(), by_cell.image_indices.numpy()

        plain, selection = capped_selection(candidates, len(push_dataset), prototype_class, cap, scan_by_cell)
    chosen, flat_location, distance, reused = selection.image, selection.location, selection.distance, selection.reused
    if current_context().is_main:
        warn_about_unused(candidates.nearest_counts, model.prototype_class, model.class_names)
        if cap is not None:
            log_cell_cap(selection, plain, prototype_class, cap, model.class_names)

    pushed = np.flatnonzero(chosen >= 0)
    for prototype in np.flatnonzero(chosen < 0):
        logger.warning("prototype %d (class %d) has no training image of its class: left unpushed",
                       prototype, int(model.prototype_class[prototype]))
    if reused.any():
        logger.warning("%d prototypes had to reuse an image already taken (too few images in their class)", int(reused.sum()))

    # Second pass over the (at most P) chosen images only, to copy their features.
    unique_images, inverse = np.unique(chosen[pushed], return_inverse=True)
    subset_loader = DataLoader(Subset(push_dataset, unique_images.tolist()), batch_size=batch_size, shuffle=False)
    features = torch.cat([model.extract_features(batch["image"].to(device)) for batch in subset_loader])
    width = features.shape[-1]
    rows = torch.as_tensor(flat_location[pushed] // width)
    cols = torch.as_tensor(flat_location[pushed] % width)
    vectors = features[torch.as_tensor(inverse, device=features.device), :, rows.to(features.device), cols.to(features.device)]

    pushed_index = torch.as_tensor(pushed, device=model.prototypes.device)
    model.prototypes.data[pushed_index] = vectors.to(model.prototypes.dtype)
    model.prototype_source_index[pushed_index] = torch.as_tensor(chosen[pushed], device=model.prototypes.device)
    model.prototype_source_location[pushed_index] = torch.stack([rows, cols], dim=1).to(model.prototypes.device)
    model.prototype_source_distance[pushed_index] = torch.as_tensor(distance[pushed], dtype=torch.float32, device=model.prototypes.device)
    broadcast_tensor(model.prototypes.data)  # bitwise identical on every rank
    model.train(was_training)
    logger.info("push: %d of %d prototypes grounded on %d distinct training images",
                len(pushed), model.num_prototypes, len(unique_images))
    return provenance_records(model, image_ids, reused, candidates.nearest_counts,
                              selection if cap is not None else None)


def _gathered(candidates: PushCandidates, k: int) -> PushCandidates:
    """Under torchrun, every rank's candidates merged in rank order (the same on every rank)."""
    if not current_context().enabled:
        return candidates
    shares = all_gather_objects(candidates)
    merged = shares[0]
    for share in shares[1:]:
        merged = merge_candidates(merged, share, k)
    return merged


def log_cell_cap(selection: PushSelection, plain: PushSelection, prototype_class: np.ndarray, cell_cap: np.ndarray,
                 class_names: list[str]) -> None:
    """One line: per class, how many prototypes the cell cap moved off a full cell (their nearest free
    patch, at their turn, lay on one) and the squared distance that cost them on average; and how many
    prototypes in all sit elsewhere than the paper's push would put them (the moved ones, and those
    whose image a moved one took first)."""
    moved = selection.moved_by_cell_cap
    elsewhere = int(((selection.image != plain.image) | (selection.location != plain.location)).sum())
    caps = "/".join(str(c) for c in sorted(set(cell_cap.tolist())))
    if not moved.any():
        logger.info("push: the cell cap (at most %s prototypes of a class per feature-map cell) moved none", caps)
        return
    parts = []
    for klass in np.unique(prototype_class[moved]):
        mine = moved & (prototype_class == klass)
        parts.append(f"{class_names[klass]} {int(mine.sum())} of {int((prototype_class == klass).sum())} "
                     f"(distance +{selection.distance_given_up[mine].mean():.3g} on average)")
    count = int(moved.sum())
    logger.info("push: the cell cap (at most %s prototypes of a class per feature-map cell) moved %d prototype%s off "
                "a full cell, onto the nearest patch elsewhere: %s; %d prototype%s in all sit elsewhere than the "
                "paper's push would put them", caps, count, "" if count == 1 else "s", "; ".join(parts), elsewhere,
                "" if elsewhere == 1 else "s")


def warn_about_unused(nearest_counts: Tensor, prototype_class: Tensor, class_names: list[str]) -> None:
    """One warning naming every class most of whose prototypes were nearest to none of its images."""
    classes = prototype_class.cpu()
    total = torch.bincount(classes, minlength=len(class_names))
    unused = torch.bincount(classes, weights=(nearest_counts == 0).double(), minlength=len(class_names)).long()
    flagged = [f"{class_names[c]} {int(unused[c])} of {int(total[c])}" for c in range(len(class_names)) if 2 * unused[c] > total[c]]
    if flagged:
        logger.warning("before this push, most prototypes of %d class(es) were the nearest of their class to none of "
                       "its training images (%s): L_clst is not pulling them onto a training patch, and the push "
                       "puts them on whichever patch lies nearest (README, 'Prototype quality')", len(flagged),
                       ", ".join(flagged))


def provenance_records(model, image_ids: list[str] | None, reused=None, nearest_counts=None,
                       cell_cap=None) -> list[dict]:
    """The checkpoint's human-readable prototype provenance; with ``nearest_counts`` (from a push) each
    record also says to how many training images of its class the prototype was the class's nearest
    just before the push; with ``cell_cap`` (a PushSelection, or anything with ``moved_by_cell_cap``
    and ``distance_given_up`` arrays) whether the cell cap moved it and the distance that cost."""
    records = []
    source = model.prototype_source_index.tolist()
    location = model.prototype_source_location.tolist()
    distance = model.prototype_source_distance.tolist()
    for prototype in range(model.num_prototypes):
        index = source[prototype]
        records.append(dict(
            prototype=prototype,
            class_index=int(model.prototype_class[prototype]),
            class_name=model.class_names[int(model.prototype_class[prototype])],
            image_index=index,
            image_id=(image_ids[index] if image_ids is not None and index >= 0 else None),
            location=location[prototype],
            distance=distance[prototype],
            reused_image=bool(reused[prototype]) if reused is not None else False,
        ))
        if nearest_counts is not None:
            records[-1]["nearest_before_push"] = int(nearest_counts[prototype])
        if cell_cap is not None:
            records[-1]["moved_by_cell_cap"] = bool(cell_cap.moved_by_cell_cap[prototype])
            records[-1]["distance_given_up"] = float(cell_cap.distance_given_up[prototype])
    return records
