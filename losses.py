"""Loss terms of CIPL (METHOD.md, section "Losses").

Every function here is a pure, batched function of tensors: no Python loop runs over images,
classes, prototypes or positions, and each works in float32 and float64.

Conventions shared by all functions:

* ``K = C + 1`` classes; "No Finding" (NF) is the **last** column, the C diseases come first.
* ``targets`` are float multi-hot ``{0, 1}`` tensors of shape ``[N, K]``.
* ``prototype_class`` is a LongTensor ``[P]``; prototype ``j`` belongs to class
  ``prototype_class[j]`` (``j // M`` in the standard layout, but any assignment works).
* ``min_distances`` ``[N, P]`` are squared L2 distances, already minimised over positions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "LossWeights",
    "cell_patches",
    "class_min_distances",
    "classification_loss",
    "cluster_loss",
    "combine_losses",
    "cross_image_loss",
    "disease_margins",
    "interpretation_alignment_loss",
    "local_reconstruction_loss",
    "prediction_alignment_loss",
    "separation_distance",
    "separation_loss",
    "shared_targets",
]

# Floor on vector norms in the cosine: keeps an all-zero similarity vector finite (cosine 0)
# instead of 0/0, and keeps the gradient finite there too.
_COSINE_EPS = 1e-8


def _check_2d(name: str, tensor: Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")


def _check_targets(logits_like: Tensor, targets: Tensor) -> None:
    _check_2d("targets", targets)
    if targets.shape != logits_like.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match {tuple(logits_like.shape)}"
        )


def _check_prototypes(min_distances: Tensor, targets: Tensor, prototype_class: Tensor) -> None:
    _check_2d("min_distances", min_distances)
    _check_2d("targets", targets)
    if prototype_class.dim() != 1 or prototype_class.shape[0] != min_distances.shape[1]:
        raise ValueError(
            f"prototype_class shape {tuple(prototype_class.shape)} does not match "
            f"P = {min_distances.shape[1]} of min_distances"
        )
    if targets.shape[0] != min_distances.shape[0]:
        raise ValueError(
            f"targets has {targets.shape[0]} rows but min_distances has {min_distances.shape[0]}"
        )


def disease_margins(logits: Tensor) -> Tensor:
    """Per-disease margin ``l_c - l_NF``, the logit of P(c) = softmax([l_NF, l_c])[1].

    Shapes: ``logits`` [N, K] -> [N, C] with C = K - 1 (NF is the last column).
    Reference: METHOD.md, Architecture, "Multi-label head": P(c) = sigma(l_c - l_NF).
    """
    _check_2d("logits", logits)
    if logits.shape[1] < 2:
        raise ValueError(f"logits need at least one disease plus NF, got {tuple(logits.shape)}")
    num_diseases = logits.shape[1] - 1
    return logits[:, :num_diseases] - logits[:, num_diseases:]


def classification_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """L_cls: mean over N images and all C diseases of the 2-way CE of [l_NF, l_c] against y_c.

    The 2-way cross-entropy equals binary cross-entropy with logit ``l_c - l_NF``, which is
    evaluated in its numerically stable form. The NF target column is not used directly: it is
    the shared negative of every disease.

    Shapes: ``logits`` [N, K], ``targets`` [N, K] multi-hot -> scalar.
    Reference: METHOD.md, Losses, L_cls.
    """
    _check_targets(logits, targets)
    margins = disease_margins(logits)
    disease_targets = targets[:, : margins.shape[1]].to(margins.dtype)
    return F.binary_cross_entropy_with_logits(margins, disease_targets, reduction="mean")


def class_min_distances(min_distances: Tensor, prototype_class: Tensor, num_classes: int) -> Tensor:
    """Per-class minimum distance: ``out[n, c] = min_{j : class(j) = c} min_distances[n, j]``.

    A class that owns no prototype gets ``+inf``.

    Shapes: ``min_distances`` [N, P], ``prototype_class`` [P] long -> [N, num_classes].
    Reference: METHOD.md, Losses, L_clst (the inner min over a class's prototypes).
    """
    _check_2d("min_distances", min_distances)
    if prototype_class.dim() != 1 or prototype_class.shape[0] != min_distances.shape[1]:
        raise ValueError(
            f"prototype_class shape {tuple(prototype_class.shape)} does not match "
            f"P = {min_distances.shape[1]}"
        )
    num_images = min_distances.shape[0]
    index = prototype_class.to(device=min_distances.device, dtype=torch.long)
    index = index.unsqueeze(0).expand(num_images, -1)
    empty = min_distances.new_full((num_images, num_classes), float("inf"))
    return empty.scatter_reduce(1, index, min_distances, reduce="amin", include_self=False)


def cluster_loss(min_distances: Tensor, targets: Tensor, prototype_class: Tensor) -> Tensor:
    """L_clst: mean over images of the sum over positive classes c of min_{j in c} d_j.

    NF counts as a class like any other: its prototypes are pulled in when the NF target is 1.

    Shapes: ``min_distances`` [N, P], ``targets`` [N, K], ``prototype_class`` [P] -> scalar.
    Reference: METHOD.md, Losses, L_clst.
    """
    _check_prototypes(min_distances, targets, prototype_class)
    per_class = class_min_distances(min_distances, prototype_class, targets.shape[1])
    # where, not multiplication: a class without prototypes has +inf and inf * 0 is NaN.
    positive = targets > 0.5
    selected = torch.where(positive, per_class, torch.zeros_like(per_class))
    return selected.sum(dim=1).mean()


def separation_distance(min_distances: Tensor, targets: Tensor, prototype_class: Tensor) -> Tensor:
    """Mean over images of the smallest distance to a prototype of a class that is NOT positive.

    An image whose positive classes own every prototype contributes ``+inf``.

    Shapes: ``min_distances`` [N, P], ``targets`` [N, K], ``prototype_class`` [P] -> scalar.
    Reference: METHOD.md, Losses, L_sep ("sep").
    """
    _check_prototypes(min_distances, targets, prototype_class)
    index = prototype_class.to(device=targets.device, dtype=torch.long)
    prototype_is_positive = (targets > 0.5)[:, index]  # [N, P]
    masked = torch.where(
        prototype_is_positive, torch.full_like(min_distances, float("inf")), min_distances
    )
    return masked.amin(dim=1).mean()


def separation_loss(
    min_distances: Tensor, targets: Tensor, prototype_class: Tensor, margin: float = 2.0
) -> Tensor:
    """Hinge on the batch separation distance: ``relu(margin - separation_distance)``.

    Shapes: ``min_distances`` [N, P], ``targets`` [N, K], ``prototype_class`` [P] -> scalar.
    Reference: METHOD.md, Losses, L_sep (penalty = relu(2.0 - sep)).
    """
    return F.relu(margin - separation_distance(min_distances, targets, prototype_class))


def shared_targets(targets_a: Tensor, targets_b: Tensor) -> Tensor:
    """Target of the co-attended features of a pair: diseases both images have.

    Disease columns are the pairwise AND; the NF column is 1 iff the pair shares no disease.

    Shapes: ``targets_a`` [B, K], ``targets_b`` [B, K] -> [B, K] (dtype of ``targets_a``).
    Reference: METHOD.md, Losses, L_cross (target y_a AND y_b).
    """
    _check_2d("targets_a", targets_a)
    if targets_a.shape != targets_b.shape:
        raise ValueError(
            f"targets_a {tuple(targets_a.shape)} and targets_b {tuple(targets_b.shape)} differ"
        )
    num_diseases = targets_a.shape[1] - 1
    both = (targets_a[:, :num_diseases] > 0.5) & (targets_b[:, :num_diseases] > 0.5)
    no_shared = ~both.any(dim=1, keepdim=True)
    return torch.cat([both, no_shared], dim=1).to(targets_a.dtype)


def cross_image_loss(
    logits_a_hat: Tensor, logits_b_hat: Tensor, targets_a: Tensor, targets_b: Tensor
) -> Tensor:
    """L_cross: L_cls of the co-attended logits of both sides against the shared targets.

    ``logits_a_hat`` are the logits of b-content at a's positions, ``logits_b_hat`` of a-content
    at b's positions; both sides are scored against ``y_a AND y_b``.

    Shapes: ``logits_a_hat``, ``logits_b_hat`` [B, K]; ``targets_a``, ``targets_b`` [B, K]
    -> scalar.
    Reference: METHOD.md, Losses, L_cross.
    """
    shared = shared_targets(targets_a, targets_b)
    logits = torch.cat([logits_a_hat, logits_b_hat], dim=0)
    return classification_loss(logits, torch.cat([shared, shared], dim=0))


def interpretation_alignment_loss(student_similarity: Tensor, teacher_similarity: Tensor) -> Tensor:
    """L_inte: mean over images of the sum over positions of ``1 - cos(S(h,w), S'(h,w))``.

    The cosine runs along the prototype axis. The teacher is detached here, so callers cannot
    leak gradient into it. Vector norms are floored at a tiny eps, so an all-zero vector has
    cosine 0 with everything rather than NaN.

    Shapes: ``student_similarity``, ``teacher_similarity`` [N, P, H, W] -> scalar.
    Reference: METHOD.md, Losses, L_inte.
    """
    if student_similarity.dim() != 4 or student_similarity.shape != teacher_similarity.shape:
        raise ValueError(
            "similarity maps must both be [N, P, H, W]; got "
            f"{tuple(student_similarity.shape)} and {tuple(teacher_similarity.shape)}"
        )
    teacher = teacher_similarity.detach().to(student_similarity.dtype)
    dot = (student_similarity * teacher).sum(dim=1)
    # sqrt of a clamped square norm: finite value and finite gradient at the zero vector.
    eps_sq = _COSINE_EPS**2
    student_norm = student_similarity.pow(2).sum(dim=1).clamp_min(eps_sq).sqrt()
    teacher_norm = teacher.pow(2).sum(dim=1).clamp_min(eps_sq).sqrt()
    cosine = dot / (student_norm * teacher_norm)
    return (1.0 - cosine).sum(dim=(1, 2)).mean()


def _pairwise_probabilities(logits: Tensor) -> Tensor:
    """``Q[n, c] = softmax([l_NF, l_c])`` as [N, C, 2]; sigmoid of the margin is overflow-safe."""
    margins = disease_margins(logits)
    return torch.stack([torch.sigmoid(-margins), torch.sigmoid(margins)], dim=-1)


def prediction_alignment_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """L_pred: batch-relational alignment of the per-disease 2-way predictions.

    For each disease c, ``Q_c = softmax([l_NF, l_c])`` over the batch ([N, 2]) and the Gram
    matrix ``G_c = Q_c Q_c^T`` ([N, N]); the loss is
    ``sum_c ||G_c^student - G_c^teacher||_F^2 / (C * N^2)``. The teacher is detached here.

    Shapes: ``student_logits``, ``teacher_logits`` [N, K] -> scalar.
    Reference: METHOD.md, Losses, L_pred.
    """
    _check_2d("student_logits", student_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and "
            f"teacher {tuple(teacher_logits.shape)} differ"
        )
    num_images, num_classes = student_logits.shape
    num_diseases = num_classes - 1
    # Student-teacher Gram differences are far below half precision's resolution: stay in float32
    # (or float64) even under autocast.
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        student_q = _pairwise_probabilities(student_logits.to(dtype))
        teacher_q = _pairwise_probabilities(teacher_logits.detach().to(dtype))
        student_gram = torch.einsum("icx,jcx->cij", student_q, student_q)
        teacher_gram = torch.einsum("icx,jcx->cij", teacher_q, teacher_q)
        return (student_gram - teacher_gram).pow(2).sum() / (num_diseases * num_images**2)


def cell_patches(images: Tensor, cells: tuple[int, int], first: float, step: int) -> Tensor:
    """The ``step`` x ``step`` block of grey pixels at each feature-map cell's receptive-field centre.

    Cell (i, j)'s receptive field is centred at ``first + i * step`` pixels down and ``first + j *
    step`` across (:class:`model.CellGrid`; pixel p covers [p, p + 1)). Its block is the one of
    ``step`` x ``step`` pixels whose centre lies nearest that point, half a pixel below and right of
    it when two are equally near: rows ``floor(first - step / 2 + 1 / 2) + i * step`` onwards, and
    the same for columns. Grey is the mean over the image's channels; pixels outside the image count
    as 0 (the mean grey of the input normalisation). Side by side the blocks cover the image but for a
    margin under ``step`` pixels wide, so they are cut by cropping or padding it to ``step * cells``
    pixels and folding each block into channels, not by a loop over cells.

    Shapes: ``images`` [N, C, S_h, S_w] -> [N, step * step, H, W], where ``cells`` = (H, W) and a
    block's pixel (r, c) is channel ``r * step + c``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, S_h, S_w], got shape {tuple(images.shape)}")
    height, width = cells
    start = math.floor(first - step / 2 + 0.5)
    grey = images.mean(dim=1, keepdim=True)
    # Negative padding crops: the framed image starts at pixel `start` and is step * cells long.
    framed = F.pad(grey, (-start, start + step * width - grey.shape[-1], -start, start + step * height - grey.shape[-2]))
    return F.pixel_unshuffle(framed, step).contiguous()


def local_reconstruction_loss(reconstruction: Tensor, images: Tensor, first: float, step: int) -> Tensor:
    """L_rec (this project's, not the paper's): mean squared error between each cell's reconstruction
    and the grey block at its receptive-field centre (:func:`cell_patches`).

    CIPL's terms reward a cell beside a lesion whose window holds it as much as the cell on it; this
    term asks every cell's features to describe what lies at its own centre as well.

    Shapes: ``reconstruction`` [N, step * step, H, W] (a decoder's output on the features),
    ``images`` [N, C, S, S] -> scalar.
    """
    if reconstruction.dim() != 4 or reconstruction.shape[1] != step * step:
        raise ValueError(f"reconstruction must be [N, {step * step}, H, W] for {step}-px blocks, "
                         f"got shape {tuple(reconstruction.shape)}")
    targets = cell_patches(images, tuple(reconstruction.shape[-2:]), first, step)
    with torch.autocast(device_type=reconstruction.device.type, enabled=False):
        return F.mse_loss(reconstruction.float(), targets.float())


@dataclass
class LossWeights:
    """Weights of the loss terms; defaults are the paper's (METHOD.md, Losses, "Total")."""

    classification: float = 1.0
    cluster: float = 0.02
    separation: float = 0.02
    separation_margin: float = 2.0
    cross_image: float = 0.5
    interpretation: float = 0.5
    prediction: float = 10.0
    local_reconstruction: float = 0.0  # not in the paper; warm-up only (settings: weight_local_reconstruction)


# The terms of a paired step (METHOD.md, Losses, "Total").
PAIRED_TERMS = (
    "classification",
    "cluster",
    "separation",
    "cross_image",
    "interpretation",
    "prediction",
)
# Keys of ``combine_losses``'s ``terms``; each is also a LossWeights field of the same name. The last
# is this project's warm-up term, not the paper's.
LOSS_TERMS = PAIRED_TERMS + ("local_reconstruction",)


def combine_losses(terms: dict[str, Tensor], weights: LossWeights) -> Tensor:
    """Weighted sum of whichever loss terms are present.

    ``terms`` may hold any subset of ``'classification', 'cluster', 'separation',
    'cross_image', 'interpretation', 'prediction', 'local_reconstruction'`` (``'separation'`` is
    already the hinge from :func:`separation_loss`); absent terms are skipped, so the warm-up stage
    passes only the first three (and ``'local_reconstruction'`` when its weight is above 0).
    Unknown keys raise ``ValueError`` so a misspelt term is never silently
    dropped.

    Shapes: each term a scalar tensor -> scalar.
    Reference: METHOD.md, Losses, "Total".
    """
    unknown = set(terms) - set(LOSS_TERMS)
    if unknown:
        raise ValueError(f"unknown loss terms {sorted(unknown)}; expected a subset of {LOSS_TERMS}")
    present = [name for name in LOSS_TERMS if name in terms]
    if not present:
        raise ValueError("combine_losses needs at least one loss term")
    total = terms[present[0]] * getattr(weights, present[0])
    for name in present[1:]:  # at most seven named terms, not a loop over data
        total = total + terms[name] * getattr(weights, name)
    return total
