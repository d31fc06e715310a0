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
"""
from __future__ import annotations

import logging
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
    """Per prototype, its nearest candidates sorted by distance ([P, k]) and its nearest count ([P])."""

    distances: Tensor  # float, inf where there is no candidate
    image_indices: Tensor  # long, dataset index, -1 where none
    locations: Tensor  # long, flat feature-map position h * W + w
    nearest_counts: Tensor  # long [P]: images of its class to which the prototype is the class's nearest


def empty_candidates(num_prototypes: int, k: int) -> PushCandidates:
    return PushCandidates(
        distances=torch.full((num_prototypes, k), float("inf")),
        image_indices=torch.full((num_prototypes, k), -1, dtype=torch.long),
        locations=torch.zeros((num_prototypes, k), dtype=torch.long),
        nearest_counts=torch.zeros(num_prototypes, dtype=torch.long),
    )


def merge_candidates(current: PushCandidates, new: PushCandidates, k: int) -> PushCandidates:
    """Keep the k nearest of both, ties to the lower image index (stable and order-independent)."""
    distances = torch.cat([current.distances, new.distances], dim=1)
    image_indices = torch.cat([current.image_indices, new.image_indices], dim=1)
    locations = torch.cat([current.locations, new.locations], dim=1)
    # Sort by image index first, then stably by distance: equal distances keep image-index order
    # no matter in which order batches (or ranks) arrived.
    missing = image_indices < 0
    by_image = torch.sort(torch.where(missing, torch.iinfo(torch.long).max, image_indices), dim=1, stable=True).indices
    distances, image_indices, locations = (t.gather(1, by_image) for t in (distances, image_indices, locations))
    order = torch.sort(distances, dim=1, stable=True).indices[:, :k]
    return PushCandidates(distances.gather(1, order), image_indices.gather(1, order), locations.gather(1, order),
                          current.nearest_counts + new.nearest_counts)


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


def select_nonrepetitive(candidates: PushCandidates, num_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Greedy, in prototype order: each prototype takes its nearest candidate whose image is unused.

    Returns (image index [P], flat location [P], distance [P], reused [P] bool). The rule is sequential
    by definition (prototype j depends on 0..j-1), so this walks the P prototypes once over small
    [P, k] arrays; a prototype whose candidates are all used falls back to its nearest (reused=True),
    one with no candidate at all gets image -1.
    """
    distances = candidates.distances.numpy()
    image_indices = candidates.image_indices.numpy()
    locations = candidates.locations.numpy()
    used = np.zeros(num_images + 1, dtype=bool)  # last slot absorbs index -1
    num_prototypes = distances.shape[0]
    chosen = np.full(num_prototypes, -1, dtype=np.int64)
    chosen_location = np.zeros(num_prototypes, dtype=np.int64)
    chosen_distance = np.full(num_prototypes, np.inf)
    reused = np.zeros(num_prototypes, dtype=bool)
    for prototype in range(num_prototypes):
        valid = np.isfinite(distances[prototype])
        if not valid.any():
            continue
        free = valid & ~used[image_indices[prototype]]
        slot = int(np.argmax(free)) if free.any() else 0
        reused[prototype] = not free.any()
        chosen[prototype] = image_indices[prototype, slot]
        chosen_location[prototype] = locations[prototype, slot]
        chosen_distance[prototype] = distances[prototype, slot]
        used[chosen[prototype]] = True
    return chosen, chosen_location, chosen_distance, reused


@torch.no_grad()
def push_prototypes(model, push_dataset, device, batch_size: int = 64, num_workers: int = 0, progress: bool = True,
                    image_ids: list[str] | None = None) -> list[dict]:
    """Project every prototype of ``model`` onto its nearest unused training patch of its class.

    push_dataset yields {"image", "target", "index"} with deterministic preprocessing (no
    augmentation). Updates model.prototypes and the provenance buffers in place and returns the
    provenance, one dict per prototype.
    """
    was_training = model.training
    model.eval()
    # Under torchrun each rank scans its own share and the shares' candidates are merged on every
    # rank in rank order. The k nearest with ties to the lower image index are unique, so the
    # selection is the same as one process scanning everything.
    shard = shard_indices(len(push_dataset))
    loader = DataLoader(Subset(push_dataset, shard), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    k = model.num_prototypes
    candidates = scan_push_set(model, loader, device, k, progress)
    if current_context().enabled:
        shares = all_gather_objects(candidates)
        candidates = empty_candidates(model.num_prototypes, k)
        for share in shares:
            candidates = merge_candidates(candidates, share, k)
    chosen, flat_location, distance, reused = select_nonrepetitive(candidates, len(push_dataset))
    if current_context().is_main:
        warn_about_unused(candidates.nearest_counts, model.prototype_class, model.class_names)

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
    return provenance_records(model, image_ids, reused, candidates.nearest_counts)


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


def provenance_records(model, image_ids: list[str] | None, reused=None, nearest_counts=None) -> list[dict]:
    """The checkpoint's human-readable prototype provenance; with ``nearest_counts`` (from a push) each
    record also says to how many training images of its class the prototype was the class's nearest
    just before the push."""
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
    return records
