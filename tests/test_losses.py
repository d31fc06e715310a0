"""Tests for losses.py: every loss against a slow, loop-based reference written in plain math.

The references below deliberately loop over images, classes, prototypes and positions and use
only ``math`` on Python floats, so they read like the formulas in METHOD.md ("Losses").
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import losses
from losses import (
    LossWeights,
    class_min_distances,
    classification_loss,
    cluster_loss,
    combine_losses,
    cross_image_loss,
    disease_margins,
    cell_patches,
    interpretation_alignment_loss,
    local_reconstruction_loss,
    prediction_alignment_loss,
    separation_distance,
    separation_loss,
    shared_targets,
)

N, C, M, H, W = 5, 3, 2, 3, 3
K = C + 1
P = M * K
NF = K - 1  # "No Finding" is the last class


# ---------------------------------------------------------------------------------------------
# Tiny random inputs
# ---------------------------------------------------------------------------------------------


def make_targets(generator: torch.Generator, n: int = N, dtype=torch.float64) -> torch.Tensor:
    """Multi-hot [n, K] with NF = 1 iff no disease; row 0 is always NF, row 1 has two diseases."""
    diseases = (torch.rand(n, C, generator=generator) < 0.4).to(dtype)
    diseases[0] = 0.0
    diseases[1] = torch.tensor([1.0, 0.0, 1.0], dtype=dtype)
    no_finding = (diseases.sum(dim=1, keepdim=True) == 0).to(dtype)
    return torch.cat([diseases, no_finding], dim=1)


def standard_prototype_class() -> torch.Tensor:
    return torch.arange(P) // M


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# ---------------------------------------------------------------------------------------------
# Slow references (explicit loops, plain math)
# ---------------------------------------------------------------------------------------------


def ref_two_way_ce(logit_nf: float, logit_c: float, label: float) -> float:
    """-log softmax([l_NF, l_c])[label], with the max subtracted so ±1e4 stays finite."""
    top = max(logit_nf, logit_c)
    log_normaliser = top + math.log(math.exp(logit_nf - top) + math.exp(logit_c - top))
    return log_normaliser - (logit_c if label == 1.0 else logit_nf)


def ref_disease_margins(logits: list[list[float]]) -> list[list[float]]:
    return [[row[c] - row[-1] for c in range(len(row) - 1)] for row in logits]


def ref_classification(logits: list[list[float]], targets: list[list[float]]) -> float:
    total, count = 0.0, 0
    for row, target in zip(logits, targets):
        num_diseases = len(row) - 1
        for c in range(num_diseases):
            total += ref_two_way_ce(row[num_diseases], row[c], target[c])
            count += 1
    return total / count


def ref_class_min(distances: list[list[float]], proto_class: list[int], k: int):
    out = []
    for row in distances:
        per_class = []
        for c in range(k):
            best = math.inf
            for j, d in enumerate(row):
                if proto_class[j] == c and d < best:
                    best = d
            per_class.append(best)
        out.append(per_class)
    return out


def ref_cluster(distances, targets, proto_class) -> float:
    total = 0.0
    for row, target in zip(distances, targets):
        for c, positive in enumerate(target):
            if positive == 1.0:
                total += min(d for j, d in enumerate(row) if proto_class[j] == c)
    return total / len(distances)


def ref_separation(distances, targets, proto_class) -> float:
    total = 0.0
    for row, target in zip(distances, targets):
        best = math.inf
        for j, d in enumerate(row):
            if target[proto_class[j]] == 0.0 and d < best:
                best = d
        total += best
    return total / len(distances)


def ref_shared(targets_a, targets_b):
    out = []
    for ta, tb in zip(targets_a, targets_b):
        num_diseases = len(ta) - 1
        row = [1.0 if (ta[c] == 1.0 and tb[c] == 1.0) else 0.0 for c in range(num_diseases)]
        row.append(1.0 if sum(row) == 0.0 else 0.0)
        out.append(row)
    return out


def ref_interpretation(student, teacher, eps: float = 1e-8) -> float:
    """student/teacher: nested lists [N][P][H][W]."""
    total = 0.0
    n_images, n_protos = len(student), len(student[0])
    height, width = len(student[0][0]), len(student[0][0][0])
    for n in range(n_images):
        for h in range(height):
            for w in range(width):
                dot = norm_s = norm_t = 0.0
                for j in range(n_protos):
                    s, t = student[n][j][h][w], teacher[n][j][h][w]
                    dot += s * t
                    norm_s += s * s
                    norm_t += t * t
                cosine = dot / (max(math.sqrt(norm_s), eps) * max(math.sqrt(norm_t), eps))
                total += 1.0 - cosine
    return total / n_images


def ref_two_way_softmax(logit_nf: float, logit_c: float) -> tuple[float, float]:
    top = max(logit_nf, logit_c)
    e_nf, e_c = math.exp(logit_nf - top), math.exp(logit_c - top)
    return e_nf / (e_nf + e_c), e_c / (e_nf + e_c)


def ref_prediction(student_logits, teacher_logits) -> float:
    n_images = len(student_logits)
    num_diseases = len(student_logits[0]) - 1
    total = 0.0
    for c in range(num_diseases):
        q_s = [ref_two_way_softmax(row[-1], row[c]) for row in student_logits]
        q_t = [ref_two_way_softmax(row[-1], row[c]) for row in teacher_logits]
        for i in range(n_images):
            for j in range(n_images):
                g_s = sum(q_s[i][x] * q_s[j][x] for x in range(2))
                g_t = sum(q_t[i][x] * q_t[j][x] for x in range(2))
                total += (g_s - g_t) ** 2
    return total / (num_diseases * n_images**2)


def scalar(value: float, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# disease_margins / classification_loss
# ---------------------------------------------------------------------------------------------


def test_disease_margins_matches_reference(generator):
    logits = torch.randn(N, K, generator=generator, dtype=torch.float64)
    expected = torch.tensor(ref_disease_margins(logits.tolist()), dtype=torch.float64)
    margins = disease_margins(logits)
    assert margins.shape == (N, C)
    assert_close(margins, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_classification_loss_matches_reference(generator, dtype):
    logits = (3 * torch.randn(N, K, generator=generator, dtype=torch.float64)).to(dtype)
    targets = make_targets(generator, dtype=dtype)
    loss = classification_loss(logits, targets)
    assert loss.dtype == dtype and loss.dim() == 0
    expected = ref_classification(logits.double().tolist(), targets.double().tolist())
    assert_close(loss, scalar(expected, dtype))


def test_classification_loss_counts_last_disease():
    # Every disease is confidently right except the last one, which is confidently wrong.
    targets = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    right = torch.tensor([[-10.0, -10.0, 10.0, 0.0]], dtype=torch.float64)
    wrong_last = torch.tensor([[-10.0, -10.0, -10.0, 0.0]], dtype=torch.float64)
    assert classification_loss(wrong_last, targets) > classification_loss(right, targets) + 3.0
    # The mean is over all C diseases: one wrong margin of -10 contributes ~10 / C.
    assert_close(
        classification_loss(wrong_last, targets),
        scalar(ref_classification(wrong_last.tolist(), targets.tolist())),
    )


def test_classification_loss_ignores_nf_target_column_but_uses_nf_logit():
    logits = torch.tensor([[1.0, -2.0, 0.5, 0.3]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    flipped_nf = targets.clone()
    flipped_nf[0, NF] = 1.0
    assert_close(classification_loss(logits, targets), classification_loss(logits, flipped_nf))
    shifted_nf = logits.clone()
    shifted_nf[0, NF] += 1.0
    assert not torch.isclose(
        classification_loss(logits, targets), classification_loss(shifted_nf, targets)
    )


def test_classification_loss_extreme_logits_finite():
    logits = torch.tensor(
        [[1e4, -1e4, 1e4, -1e4], [-1e4, 1e4, -1e4, 1e4]], dtype=torch.float32, requires_grad=True
    )
    targets = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    loss = classification_loss(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    expected = ref_classification(logits.detach().double().tolist(), targets.double().tolist())
    assert_close(loss, scalar(expected, torch.float32))


def test_classification_loss_rejects_mismatched_targets():
    with pytest.raises(ValueError):
        classification_loss(torch.zeros(2, K), torch.zeros(2, C))


# ---------------------------------------------------------------------------------------------
# class_min_distances / cluster_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_min_distances_matches_reference_any_prototype_order(generator, dtype):
    distances = (5 * torch.rand(N, P, generator=generator, dtype=torch.float64)).to(dtype)
    proto_class = standard_prototype_class()[torch.randperm(P, generator=generator)]
    out = class_min_distances(distances, proto_class, K)
    assert out.shape == (N, K) and out.dtype == dtype
    expected = ref_class_min(distances.double().tolist(), proto_class.tolist(), K)
    assert_close(out, torch.tensor(expected, dtype=dtype))


def test_class_min_distances_class_without_prototypes_is_inf(generator):
    distances = torch.rand(N, 4, generator=generator, dtype=torch.float64)
    proto_class = torch.tensor([0, 0, 2, 2])
    out = class_min_distances(distances, proto_class, 3)
    assert torch.isinf(out[:, 1]).all()
    assert_close(out[:, 0], distances[:, :2].amin(dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cluster_loss_matches_reference(generator, dtype):
    distances = (5 * torch.rand(N, P, generator=generator, dtype=torch.float64)).to(dtype)
    targets = make_targets(generator, dtype=dtype)
    proto_class = standard_prototype_class()
    loss = cluster_loss(distances, targets, proto_class)
    assert loss.dtype == dtype
    expected = ref_cluster(
        distances.double().tolist(), targets.double().tolist(), proto_class.tolist()
    )
    assert_close(loss, scalar(expected, dtype))


def test_cluster_loss_includes_no_finding_when_positive(generator):
    distances = torch.rand(1, P, generator=generator, dtype=torch.float64) + 1.0
    proto_class = standard_prototype_class()
    nf_only = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    nf_min = distances[0, NF * M : (NF + 1) * M].min()
    assert_close(cluster_loss(distances, nf_only, proto_class), nf_min)
    # Moving an NF prototype closer must lower the loss.
    closer = distances.clone()
    closer[0, NF * M] = 0.1
    assert_close(cluster_loss(closer, nf_only, proto_class), scalar(0.1))


def test_cluster_loss_gradient_hits_only_positive_class_argmins():
    distances = torch.tensor(
        [[0.5, 0.2, 0.9, 0.7, 0.4, 0.3, 0.8, 0.6], [0.1, 0.2, 0.3, 0.4, 0.6, 0.5, 0.9, 0.8]],
        dtype=torch.float64,
        requires_grad=True,
    )
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    cluster_loss(distances, targets, standard_prototype_class()).backward()
    expected = torch.zeros(2, P, dtype=torch.float64)
    expected[0, 1] = 0.5  # class 0 argmin, 1 / N
    expected[0, 5] = 0.5  # class 2 argmin
    expected[1, 7] = 0.5  # NF argmin
    assert_close(distances.grad, expected)


def test_cluster_loss_class_without_prototypes_is_not_nan():
    distances = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    proto_class = torch.tensor([0, 0, 2, 2])  # class 1 owns no prototype
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    loss = cluster_loss(distances, targets, proto_class)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(distances.grad).all()


# ---------------------------------------------------------------------------------------------
# separation_distance / separation_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_separation_distance_matches_reference(generator, dtype):
    distances = (5 * torch.rand(N, P, generator=generator, dtype=torch.float64)).to(dtype)
    targets = make_targets(generator, dtype=dtype)
    proto_class = standard_prototype_class()
    sep = separation_distance(distances, targets, proto_class)
    assert sep.dtype == dtype and sep.dim() == 0
    expected = ref_separation(
        distances.double().tolist(), targets.double().tolist(), proto_class.tolist()
    )
    assert_close(sep, scalar(expected, dtype))


def test_separation_excludes_positive_classes():
    proto_class = standard_prototype_class()
    distances = torch.full((1, P), 3.0, dtype=torch.float64)
    targets = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    distances[0, 1 * M] = 0.01  # a prototype of the positive class 1: must be ignored
    distances[0, 2 * M + 1] = 1.5  # nearest prototype of a negative class
    assert_close(separation_distance(distances, targets, proto_class), scalar(1.5))
    # Once class 1 is negative its near prototype becomes the separation distance.
    nf_targets = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    assert_close(separation_distance(distances, nf_targets, proto_class), scalar(0.01))


def test_separation_loss_is_hinge_on_batch_mean(generator):
    proto_class = standard_prototype_class()
    targets = make_targets(generator)
    distances = (3 * torch.rand(N, P, generator=generator, dtype=torch.float64)).requires_grad_()
    sep = ref_separation(distances.tolist(), targets.tolist(), proto_class.tolist())
    for margin in (0.0, sep - 0.1, sep + 0.25, 2.0, 10.0):
        loss = separation_loss(distances, targets, proto_class, margin=margin)
        assert_close(loss, scalar(max(0.0, margin - sep)))
    assert_close(
        separation_loss(distances, targets, proto_class),
        scalar(max(0.0, 2.0 - sep)),
    )
    # The hinge pushes negative-class prototypes away: gradient is negative on the argmins.
    separation_loss(distances, targets, proto_class, margin=sep + 1.0).backward()
    assert (distances.grad <= 0).all() and (distances.grad < 0).sum() >= N


# ---------------------------------------------------------------------------------------------
# shared_targets / cross_image_loss
# ---------------------------------------------------------------------------------------------


def test_shared_targets_matches_reference(generator):
    targets_a = make_targets(generator, n=6)
    targets_b = make_targets(generator, n=6)
    targets_b[2] = targets_a[2]  # ensure at least one pair that shares its diseases
    out = shared_targets(targets_a, targets_b)
    expected = torch.tensor(ref_shared(targets_a.tolist(), targets_b.tolist()), dtype=torch.float64)
    assert_close(out, expected)


def test_shared_targets_nf_iff_no_shared_disease():
    targets_a = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    targets_b = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    expected = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    assert_close(shared_targets(targets_a, targets_b), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_image_loss_matches_reference(generator, dtype):
    pairs = 4
    logits_a = (2 * torch.randn(pairs, K, generator=generator, dtype=torch.float64)).to(dtype)
    logits_b = (2 * torch.randn(pairs, K, generator=generator, dtype=torch.float64)).to(dtype)
    targets_a = make_targets(generator, n=pairs, dtype=dtype)
    targets_b = make_targets(generator, n=pairs, dtype=dtype)
    loss = cross_image_loss(logits_a, logits_b, targets_a, targets_b)
    assert loss.dtype == dtype
    shared = ref_shared(targets_a.double().tolist(), targets_b.double().tolist())
    expected = ref_classification(
        logits_a.double().tolist() + logits_b.double().tolist(), shared + shared
    )
    assert_close(loss, scalar(expected, dtype))


def test_cross_image_loss_extreme_logits_finite():
    logits_a = torch.tensor([[1e4, -1e4, 1e4, -1e4]], requires_grad=True)
    logits_b = torch.tensor([[-1e4, 1e4, -1e4, 1e4]], requires_grad=True)
    targets_a = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    targets_b = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    loss = cross_image_loss(logits_a, logits_b, targets_a, targets_b)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits_a.grad).all() and torch.isfinite(logits_b.grad).all()


# ---------------------------------------------------------------------------------------------
# interpretation_alignment_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interpretation_loss_matches_reference(generator, dtype):
    student = torch.rand(N, P, H, W, generator=generator, dtype=torch.float64).to(dtype)
    teacher = torch.rand(N, P, H, W, generator=generator, dtype=torch.float64).to(dtype)
    loss = interpretation_alignment_loss(student, teacher)
    assert loss.dtype == dtype and loss.dim() == 0
    expected = ref_interpretation(student.double().tolist(), teacher.double().tolist())
    assert_close(loss, scalar(expected, dtype))


def test_interpretation_loss_zero_for_identical_and_teacher_scale_invariant(generator):
    student = torch.rand(N, P, H, W, generator=generator, dtype=torch.float64)
    teacher = torch.rand(N, P, H, W, generator=generator, dtype=torch.float64)
    assert_close(interpretation_alignment_loss(student, student.clone()), scalar(0.0))
    base = interpretation_alignment_loss(student, teacher)
    assert base > 0.01
    assert_close(interpretation_alignment_loss(student, 7.5 * teacher), base)
    # Per-position positive rescaling also leaves every cosine unchanged.
    per_position = 0.1 + torch.rand(N, 1, H, W, generator=generator, dtype=torch.float64)
    assert_close(interpretation_alignment_loss(student, per_position * teacher), base)


def test_interpretation_loss_sums_positions_and_averages_images():
    # Orthogonal similarity vectors at every position: each position contributes exactly 1.
    student = torch.zeros(2, 2, H, W, dtype=torch.float64)
    teacher = torch.zeros(2, 2, H, W, dtype=torch.float64)
    student[:, 0] = 1.0
    teacher[:, 1] = 1.0
    assert_close(interpretation_alignment_loss(student, teacher), scalar(float(H * W)))


def test_interpretation_loss_zero_vectors_finite():
    student = torch.zeros(2, P, H, W, dtype=torch.float64, requires_grad=True)
    teacher = torch.rand(2, P, H, W, dtype=torch.float64)
    teacher[1] = 0.0
    loss = interpretation_alignment_loss(student, teacher)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert_close(loss, scalar(float(H * W)))  # cosine with a zero vector counts as 0


def test_interpretation_loss_gradient_reaches_student_not_teacher(generator):
    student = torch.rand(N, P, H, W, generator=generator, dtype=torch.float64).requires_grad_()
    teacher = torch.rand(N, P, H, W, generator=generator, dtype=torch.float64).requires_grad_()
    interpretation_alignment_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_interpretation_loss_extreme_values_finite(generator):
    student = (1e4 * torch.rand(N, P, H, W, generator=generator)).requires_grad_()
    teacher = 1e4 * torch.rand(N, P, H, W, generator=generator)
    loss = interpretation_alignment_loss(student, teacher)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


# ---------------------------------------------------------------------------------------------
# prediction_alignment_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prediction_loss_matches_reference(generator, dtype):
    student = (2 * torch.randn(N, K, generator=generator, dtype=torch.float64)).to(dtype)
    teacher = (2 * torch.randn(N, K, generator=generator, dtype=torch.float64)).to(dtype)
    loss = prediction_alignment_loss(student, teacher)
    assert loss.dtype == dtype and loss.dim() == 0
    expected = ref_prediction(student.double().tolist(), teacher.double().tolist())
    assert expected > 1e-3  # the test inputs really differ
    assert_close(loss, scalar(expected, dtype))


def test_prediction_loss_zero_for_identical_logits(generator):
    logits = torch.randn(N, K, generator=generator, dtype=torch.float64)
    assert_close(prediction_alignment_loss(logits, logits.clone()), scalar(0.0))
    # Adding the same constant to every class of an image changes no 2-way softmax.
    shifted = logits + torch.randn(N, 1, generator=generator, dtype=torch.float64)
    assert_close(prediction_alignment_loss(logits, shifted), scalar(0.0))


def test_prediction_loss_gradient_reaches_student_not_teacher(generator):
    student = torch.randn(N, K, generator=generator, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(N, K, generator=generator, dtype=torch.float64).requires_grad_()
    prediction_alignment_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_prediction_loss_extreme_logits_finite():
    student = torch.tensor(
        [[1e4, -1e4, 0.0, -1e4], [-1e4, 1e4, 1e4, 1e4], [0.0, 0.0, 0.0, 0.0]], requires_grad=True
    )
    teacher = torch.tensor([[-1e4, 1e4, 0.0, 1e4], [1e4, -1e4, 1e4, -1e4], [1.0, 0.0, 0.0, 0.0]])
    loss = prediction_alignment_loss(student, teacher)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    expected = ref_prediction(student.detach().double().tolist(), teacher.double().tolist())
    assert_close(loss, scalar(expected, torch.float32))


# ---------------------------------------------------------------------------------------------
# cell_patches / local_reconstruction_loss
# ---------------------------------------------------------------------------------------------


def ref_cell_patch(image, i: int, j: int, first: float, step: int) -> list[float]:
    """The grey block of cell (i, j), pixel by pixel: the step x step pixels whose centre lies nearest
    the cell's receptive-field centre (half a pixel down and right on a tie), 0 outside the image."""
    channels, height, width = len(image), len(image[0]), len(image[0][0])

    def nearest_start(centre: float) -> int:  # a block from p to p + step has its centre at p + step / 2
        candidates = range(math.floor(centre) - step, math.ceil(centre) + 1)
        return min(candidates, key=lambda start: (abs(start + step / 2 - centre), -start))

    top, left = nearest_start(first + i * step), nearest_start(first + j * step)
    block = []
    for row in range(top, top + step):
        for column in range(left, left + step):
            inside = 0 <= row < height and 0 <= column < width
            block.append(sum(image[c][row][column] for c in range(channels)) / channels if inside else 0.0)
    # The block's centre lies within half a pixel of the cell's centre.
    assert abs(top + step / 2 - (first + i * step)) <= 0.5 and abs(left + step / 2 - (first + j * step)) <= 0.5
    return block


def ref_local_reconstruction(reconstruction, images, first: float, step: int) -> float:
    total, count = 0.0, 0
    for n, image in enumerate(images):
        for i in range(len(reconstruction[n][0])):
            for j in range(len(reconstruction[n][0][0])):
                block = ref_cell_patch(image, i, j, first, step)
                for k, pixel in enumerate(block):
                    total += (reconstruction[n][k][i][j] - pixel) ** 2
                    count += 1
    return total / count


# (image height and width, cells, first receptive-field centre, step): the tiny backbone's grid (a
# block hangs 3 px over the top and left edge), DenseNet-121's (+14 px), a ResNet's (15.5 px over), a
# grid that needs the image cropped at the bottom right, an off-grid centre, and a wide image.
CELL_GRIDS = [((32, 32), (4, 4), 0.5, 8), ((64, 64), (2, 2), 14.5, 32), ((64, 64), (2, 2), 0.5, 32),
              ((21, 21), (2, 2), 2.5, 4), ((24, 24), (3, 3), 3.3, 8), ((40, 64), (5, 8), 0.5, 8)]


@pytest.mark.parametrize("side, cells, first, step", CELL_GRIDS)
def test_cell_patches_match_reference(generator, side, cells, first, step):
    images = torch.randn(2, 3, *side, generator=generator, dtype=torch.float64)
    patches = cell_patches(images, cells, first, step)
    assert patches.shape == (2, step * step, *cells)
    nested = images.tolist()
    for n in range(2):
        for i in range(cells[0]):
            for j in range(cells[1]):
                assert_close(patches[n, :, i, j], torch.tensor(ref_cell_patch(nested[n], i, j, first, step), dtype=torch.float64))


def test_cell_patches_same_in_channels_last_memory():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(cell_patches(images.contiguous(memory_format=torch.channels_last), (4, 4), 0.5, 8),
                       cell_patches(images, (4, 4), 0.5, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("side, cells, first, step", CELL_GRIDS[::3])
def test_local_reconstruction_loss_matches_reference(generator, dtype, side, cells, first, step):
    images = torch.randn(3, 3, *side, generator=generator, dtype=dtype)
    reconstruction = torch.randn(3, step * step, *cells, generator=generator, dtype=dtype)
    loss = local_reconstruction_loss(reconstruction, images, first, step)
    expected = ref_local_reconstruction(reconstruction.tolist(), images.tolist(), first, step)
    assert_close(loss.double(), scalar(expected), rtol=1e-5 if dtype == torch.float32 else 1e-7, atol=0.0)


def test_local_reconstruction_loss_is_zero_for_the_blocks_and_trains_the_reconstruction(generator):
    images = torch.randn(2, 3, 32, 32, generator=generator)
    exact = cell_patches(images, (4, 4), 0.5, 8).requires_grad_()
    assert local_reconstruction_loss(exact, images, 0.5, 8).item() == 0.0
    wrong = (exact.detach() + 1.0).requires_grad_()
    local_reconstruction_loss(wrong, images, 0.5, 8).backward()
    assert_close(wrong.grad, torch.full_like(wrong, 2.0 / wrong.numel()))


def test_local_reconstruction_loss_rejects_a_reconstruction_of_the_wrong_size(generator):
    images = torch.randn(1, 3, 32, 32, generator=generator)
    with pytest.raises(ValueError, match="64"):
        local_reconstruction_loss(torch.zeros(1, 16, 4, 4), images, 0.5, 8)


def test_local_reconstruction_loss_is_float32_under_autocast(generator):
    images = torch.randn(2, 3, 32, 32, generator=generator)
    reconstruction = torch.randn(2, 64, 4, 4, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = local_reconstruction_loss(reconstruction.bfloat16(), images, 0.5, 8)
    assert loss.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# LossWeights / combine_losses
# ---------------------------------------------------------------------------------------------


def test_loss_weights_paper_defaults():
    weights = LossWeights()
    assert (weights.classification, weights.cluster, weights.separation) == (1.0, 0.02, 0.02)
    assert weights.separation_margin == 2.0
    assert (weights.cross_image, weights.interpretation, weights.prediction) == (0.5, 0.5, 10.0)
    assert weights.local_reconstruction == 0.0  # not in the paper


def test_combine_losses_weights_every_term():
    values = {
        "classification": 1.5,
        "cluster": 2.0,
        "separation": 0.25,
        "cross_image": 0.75,
        "interpretation": 3.0,
        "prediction": 0.125,
        "local_reconstruction": 0.5,
    }
    terms = {name: scalar(value) for name, value in values.items()}
    weights = LossWeights(
        classification=2.0, cluster=0.5, separation=4.0, cross_image=3.0, interpretation=0.1,
        prediction=8.0, local_reconstruction=0.25,
    )
    expected = 2.0 * 1.5 + 0.5 * 2.0 + 4.0 * 0.25 + 3.0 * 0.75 + 0.1 * 3.0 + 8.0 * 0.125 + 0.25 * 0.5
    assert_close(combine_losses(terms, weights), scalar(expected))


def test_combine_losses_skips_absent_terms_and_keeps_gradients():
    classification = scalar(1.0).requires_grad_()
    cluster = scalar(10.0).requires_grad_()
    separation = scalar(0.5).requires_grad_()
    total = combine_losses(
        {"classification": classification, "cluster": cluster, "separation": separation},
        LossWeights(),
    )
    assert_close(total, scalar(1.0 + 0.02 * 10.0 + 0.02 * 0.5))
    total.backward()
    assert_close(cluster.grad, scalar(0.02))
    assert_close(classification.grad, scalar(1.0))


def test_combine_losses_rejects_unknown_or_empty_terms():
    with pytest.raises(ValueError):
        combine_losses({"clasification": scalar(1.0)}, LossWeights())
    with pytest.raises(ValueError):
        combine_losses({}, LossWeights())


def test_every_combinable_term_has_a_weight():
    for name in losses.LOSS_TERMS:
        assert isinstance(getattr(LossWeights(), name), float)


# ---------------------------------------------------------------------------------------------
# Structure: no Python loops over data in the implementation
# ---------------------------------------------------------------------------------------------


def test_only_combine_losses_loops_and_only_over_term_names():
    import ast
    import inspect

    loop_types = (ast.For, ast.While, ast.ListComp, ast.GeneratorExp, ast.DictComp, ast.SetComp)
    tree = ast.parse(inspect.getsource(losses))
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    assert len(functions) >= 12
    for function in functions:
        has_loop = any(isinstance(node, loop_types) for node in ast.walk(function))
        # combine_losses walks the (at most seven) named terms; nothing else may loop.
        assert has_loop == (function.name == "combine_losses"), function.name


def test_prediction_alignment_is_computed_in_float32_under_autocast():
    torch.manual_seed(0)
    student = torch.randn(6, 4) * 3 + 40  # logits of the size M prototypes give (~M)
    teacher = student + 1e-3 * torch.randn(6, 4)
    exact = prediction_alignment_loss(student.double(), teacher.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = prediction_alignment_loss(student, teacher)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast.double(), exact, rtol=1e-3, atol=1e-9)
