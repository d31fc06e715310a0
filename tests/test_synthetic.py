"""Tests for utils/synthetic.py: determinism, label/box consistency, the co-occurrence structure that
CIPL is meant to disentangle, and that every lesion really changes the pixels inside its box."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from utils import synthetic
from utils.prototype_quality import GROUNDING_IOBB, HIGH_ACTIVATION_SHARE
from utils.synthetic import (
    SYNTHETIC_CLASS_NAMES, SYNTHETIC_DISEASES, SyntheticCase, case_seed, disease_prevalence, render_case,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_DISEASES = len(SYNTHETIC_DISEASES)
NO_FINDING = len(SYNTHETIC_CLASS_NAMES) - 1
ATELECTASIS, CARDIOMEGALY, EFFUSION, MASS, NODULE, PNEUMOTHORAX = range(NUM_DISEASES)
STATS_CASES = 2000
STATS_SIZE = 48  # labels do not depend on the size; small keeps the suite fast


@pytest.fixture(scope="module")
def train_cases() -> list[SyntheticCase]:
    return [render_case(case_seed(0, "train", index), STATS_SIZE) for index in range(STATS_CASES)]


@pytest.fixture(scope="module")
def train_targets(train_cases) -> np.ndarray:
    return np.stack([case.target for case in train_cases])


def _box_mean(image: np.ndarray, box) -> float:
    _, x, y, w, h = box
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    x1, y1 = int(np.ceil(x + w)), int(np.ceil(y + h))
    return float(image[y0:y1, x0:x1].mean())


def test_class_names_put_no_finding_last():
    assert SYNTHETIC_DISEASES == ("Atelectasis", "Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumothorax")
    assert SYNTHETIC_CLASS_NAMES == SYNTHETIC_DISEASES + ("No Finding",)


def test_case_seed_is_deterministic_and_splits_never_share_a_seed():
    assert case_seed(7, "train", 3) == case_seed(7, "train", 3)
    seeds = {
        split: [case_seed(split_seed, split, i) for split_seed in (0, 1) for i in range(1000)]
        for split in ("train", "val", "test")
    }
    for split, values in seeds.items():
        assert all(isinstance(v, int) and v >= 0 for v in values)
        assert len(set(values)) == len(values), f"seed collision inside {split}"
    assert not set(seeds["train"]) & set(seeds["val"])
    assert not set(seeds["train"]) & set(seeds["test"])
    assert not set(seeds["val"]) & set(seeds["test"])
    # Neighbouring indices and split seeds must not map to neighbouring seeds (well mixed).
    assert abs(case_seed(0, "train", 1) - case_seed(0, "train", 0)) > 2**32
    assert case_seed(0, "train", 0) != case_seed(1, "train", 0)


@pytest.mark.parametrize("split_seed, split, index", [(0, "validation", 0), (0, "train", -1), (-1, "train", 0)])
def test_case_seed_rejects_bad_arguments(split_seed, split, index):
    with pytest.raises(ValueError):
        case_seed(split_seed, split, index)


def test_same_seed_renders_identical_case_regardless_of_order():
    seeds = [case_seed(3, "val", i) for i in range(4)]
    forward = [render_case(seed, 96) for seed in seeds]
    backward = [render_case(seed, 96) for seed in reversed(seeds)][::-1]
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.target, b.target)
        assert a.boxes == b.boxes


def _fingerprint(case: SyntheticCase) -> str:
    return hashlib.sha256(case.image.tobytes() + case.target.tobytes() + repr(case.boxes).encode()).hexdigest()


def test_render_is_identical_in_a_fresh_process_with_another_hash_seed():
    script = (
        "import sys\n"
        "from tests.test_synthetic import _fingerprint\n"
        "from utils.synthetic import case_seed, render_case\n"
        "sys.stdout.write(_fingerprint(render_case(case_seed(5, 'test', 11), 64)))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout == _fingerprint(render_case(case_seed(5, "test", 11), 64))


def test_different_splits_give_different_images():
    for index in range(3):
        images = [render_case(case_seed(0, split, index), 64).image for split in ("train", "val", "test")]
        assert not np.array_equal(images[0], images[1])
        assert not np.array_equal(images[0], images[2])
        assert not np.array_equal(images[1], images[2])


@pytest.mark.parametrize("size", [32, 97, 160, 333])
def test_image_dtype_shape_and_range(size):
    for index in range(3):
        case = render_case(case_seed(1, "train", index), size)
        assert case.image.dtype == np.uint8 and case.image.shape == (size, size)
        assert case.target.dtype == np.float32 and case.target.shape == (len(SYNTHETIC_CLASS_NAMES),)
        # A real image, not a constant or a saturated frame: dark lungs, bright mediastinum.
        assert case.image.std() > 15
        assert int(case.image.max()) - int(case.image.min()) > 80
        assert (case.image == 255).mean() < 0.05


def test_rejects_images_too_small_to_draw():
    with pytest.raises(ValueError):
        render_case(0, 16)


def test_scene_does_not_depend_on_image_size():
    for index in range(20):
        seed = case_seed(2, "train", index)
        small, large = render_case(seed, 64), render_case(seed, 256)
        np.testing.assert_array_equal(small.target, large.target)
        assert [b[0] for b in small.boxes] == [b[0] for b in large.boxes]
        for a, b in zip(small.boxes, large.boxes):
            # Same geometry up to pixel rounding (2 px at 64 is 8 px at 256, plus edge softness).
            np.testing.assert_allclose(np.array(a[1:]) * 4, np.array(b[1:]), atol=12)


def test_targets_are_multi_hot_and_consistent_with_boxes(train_cases):
    for case in train_cases:
        target = case.target
        assert set(np.unique(target)) <= {0.0, 1.0}
        diseases = set(np.flatnonzero(target[:NUM_DISEASES]).tolist())
        assert target[NO_FINDING] == (0.0 if diseases else 1.0)
        assert len(diseases) <= 3
        boxed = [box[0] for box in case.boxes]
        assert set(boxed) == diseases  # a normal case has no boxes; every positive disease has one
        assert all(boxed.count(disease) == 1 for disease in diseases)  # a nodule cluster has one box
        for class_index, x, y, w, h in case.boxes:
            assert isinstance(class_index, int) and 0 <= class_index < NUM_DISEASES
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= STATS_SIZE + 1e-6 and y + h <= STATS_SIZE + 1e-6


def test_lesions_are_large_enough_for_the_grounding_score_to_credit_them(train_cases):
    """A prototype counts as grounded when its high-activation region (a fixed share of the image)
    lies at least half inside a box of its class, so a box under half that share can never count.
    The proving ground draws its lesions so that most of every class can (the earlier generator: no
    nodule, 57 % of the masses and 43 % of the atelectases, measured on these 2000 cases).
    """
    smallest = HIGH_ACTIVATION_SHARE * GROUNDING_IOBB
    least_share = {ATELECTASIS: 0.6, CARDIOMEGALY: 0.99, EFFUSION: 0.99, MASS: 0.9, NODULE: 0.75, PNEUMOTHORAX: 0.99}
    areas = {disease: [] for disease in range(NUM_DISEASES)}
    for case in train_cases:
        for disease, _, _, w, h in case.boxes:
            areas[disease].append(w * h / STATS_SIZE**2)
    for disease, share in least_share.items():
        large_enough = np.mean(np.asarray(areas[disease]) >= smallest)
        assert large_enough >= share, (SYNTHETIC_DISEASES[disease], large_enough)


def test_prevalence_and_normal_share(train_targets):
    prevalence = train_targets[:, :NUM_DISEASES].mean(axis=0)
    for name, value in zip(SYNTHETIC_DISEASES, prevalence):
        assert 0.08 <= value <= 0.30, f"{name} prevalence {value:.3f}"
    assert 0.35 <= train_targets[:, NO_FINDING].mean() <= 0.45
    counts = train_targets[:, :NUM_DISEASES].sum(axis=1)
    assert (counts >= 2).mean() > 0.10  # multi-label cases are common
    assert (counts == 3).mean() > 0.01


def test_diseases_co_occur_like_nih_but_each_also_appears_alone(train_targets):
    diseases = train_targets[:, :NUM_DISEASES] == 1

    def conditional(given: int, event: int) -> float:
        return float(diseases[diseases[:, given], event].mean())

    prevalence = diseases.mean(axis=0)
    assert conditional(EFFUSION, CARDIOMEGALY) > 0.5  # effusion mostly with cardiomegaly
    assert conditional(EFFUSION, CARDIOMEGALY) > 2 * prevalence[CARDIOMEGALY]
    assert conditional(CARDIOMEGALY, EFFUSION) > 2 * prevalence[EFFUSION]
    assert conditional(MASS, NODULE) > 2 * prevalence[NODULE]
    assert conditional(NODULE, MASS) > 1.5 * prevalence[MASS]
    assert conditional(ATELECTASIS, EFFUSION) > 1.5 * prevalence[EFFUSION]
    # Unrelated pairs stay near independence, so the correlations above are the structure, not noise.
    assert conditional(PNEUMOTHORAX, CARDIOMEGALY) < 0.5 * prevalence[CARDIOMEGALY] + 0.05
    only_one = diseases.sum(axis=1) == 1
    for index, name in enumerate(SYNTHETIC_DISEASES):
        assert (diseases[:, index] & only_one).mean() > 0.01, f"{name} is (almost) never alone"


@pytest.fixture(scope="module")
def centred_cases() -> list[SyntheticCase]:
    """The training cases with the patient pose switched off (same draws otherwise), so that a box
    covers the same anatomy in every image."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synthetic, "_POSE_SHIFT", 0.0)
        patch.setattr(synthetic, "_POSE_ZOOM", 0.0)
        return [render_case(case_seed(0, "train", index), STATS_SIZE) for index in range(STATS_CASES)]


def test_patient_pose_moves_image_and_boxes_together(centred_cases, train_cases):
    shifts = np.array([case.pose for case in train_cases])
    assert np.abs(shifts[:, :2]).max() <= synthetic._POSE_SHIFT and np.abs(shifts[:, 2] - 1).max() <= synthetic._POSE_ZOOM
    assert shifts[:, 0].std() > synthetic._POSE_SHIFT / 3  # spread, not a constant offset
    size = STATS_SIZE
    for centred, posed in zip(centred_cases[:200], train_cases[:200]):
        np.testing.assert_array_equal(centred.target, posed.target)
        assert centred.pose == (0.0, 0.0, 1.0)
        shift_x, shift_y, scale = posed.pose
        for (label, x, y, w, h), (posed_label, *posed_box) in zip(centred.boxes, posed.boxes):
            # The centred box, zoomed about the image centre and shifted, then clipped to the image.
            left, top = size / 2 + scale * (x - size / 2) + shift_x * size, size / 2 + scale * (y - size / 2) + shift_y * size
            right, bottom = left + scale * w, top + scale * h
            expected = np.clip([left, top, right, bottom], 0, size)
            got = np.array([posed_box[0], posed_box[1], posed_box[0] + posed_box[2], posed_box[1] + posed_box[3]])
            assert posed_label == label
            np.testing.assert_allclose(got, expected, atol=1.0)
    # The image is the centred scene warped the same way (up to the noise drawn after the warp).
    size = 96
    for index in range(12):
        seed = case_seed(0, "train", index)
        posed = render_case(seed, size)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(synthetic, "_POSE_SHIFT", 0.0)
            patch.setattr(synthetic, "_POSE_ZOOM", 0.0)
            centred = render_case(seed, size)
        shift_x, shift_y, scale = posed.pose
        matrix = np.array([[scale, 0, (1 - scale) * (size / 2 - 0.5) + shift_x * size],
                           [0, scale, (1 - scale) * (size / 2 - 0.5) + shift_y * size]])
        smooth = lambda image: cv2.GaussianBlur(image.astype(np.float32), (0, 0), 2.0)[12:-12, 12:-12]
        warped = cv2.warpAffine(centred.image.astype(np.float32), matrix, (size, size), borderMode=cv2.BORDER_REPLICATE)
        error = np.abs(smooth(warped) - smooth(posed.image)).mean()
        unwarped = np.abs(smooth(centred.image) - smooth(posed.image)).mean()
        assert error < 2.0 and (error < 0.5 * unwarped or abs(shift_x) + abs(shift_y) + abs(scale - 1) < 0.02)


def test_lesions_change_the_pixels_inside_their_boxes(centred_cases, train_targets):
    """Compare each lesion box with the same box in normal images (patient pose off, so a box covers
    the same anatomy everywhere).

    Images are normalised by their own median and 10-90 % spread to remove exposure differences. The
    reference is the mean normalised normal image (half of the normals); a control measures unseen
    normal images through the same boxes. If a lesion were not drawn, lesion and control would agree.
    """
    train_cases = centred_cases
    images = np.stack([case.image for case in train_cases]).astype(np.float32)
    flat = images.reshape(len(images), -1)
    low, median, high = np.percentile(flat, [10, 50, 90], axis=1)
    normalised = (images - median[:, None, None]) / (high - low)[:, None, None]
    normal = np.flatnonzero(train_targets[:, NO_FINDING] == 1)
    reference = normalised[normal[0::2]].mean(axis=0)
    controls = normal[1::2]

    expected_sign = {ATELECTASIS: 1, CARDIOMEGALY: 1, EFFUSION: 1, MASS: 1, NODULE: 1, PNEUMOTHORAX: -1}
    for disease, sign in expected_sign.items():
        lesion, control = [], []
        for case_index, case in enumerate(train_cases):
            for box in case.boxes:
                if box[0] != disease:
                    continue
                baseline = _box_mean(reference, box)
                lesion.append(_box_mean(normalised[case_index], box) - baseline)
                control.append(_box_mean(normalised[controls[len(control) % len(controls)]], box) - baseline)
        lesion, control = sign * np.array(lesion), sign * np.array(control)
        name = SYNTHETIC_DISEASES[disease]
        assert len(lesion) > 100, name
        assert np.median(lesion) - np.median(control) > 0.03, name
        assert (lesion > np.median(control)).mean() > 0.6, name


# -- the decorrelated test split ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def decorrelated_targets() -> np.ndarray:
    cases = [render_case(case_seed(0, "test-decorrelated", index), STATS_SIZE, decorrelated=True)
             for index in range(STATS_CASES)]
    return np.stack([case.target for case in cases])


def test_prevalence_is_exact_under_the_clinical_model(train_targets):
    expected = disease_prevalence()
    observed = train_targets[:, :NUM_DISEASES].mean(axis=0)
    # 2000 cases: a binomial standard error of at most 0.011 per disease.
    np.testing.assert_allclose(observed, expected, atol=0.035)


def test_decorrelated_split_keeps_the_prevalences_but_not_the_co_occurrence(train_targets, decorrelated_targets):
    diseases = decorrelated_targets[:, :NUM_DISEASES] == 1
    np.testing.assert_allclose(diseases.mean(axis=0), disease_prevalence(), atol=0.035)
    assert abs(decorrelated_targets[:, NO_FINDING].mean() - np.prod(1 - disease_prevalence())) < 0.035

    def phi(targets: np.ndarray, first: int, second: int) -> float:
        return float(np.corrcoef(targets[:, first], targets[:, second])[0, 1])

    for first, second in [(EFFUSION, CARDIOMEGALY), (MASS, NODULE), (ATELECTASIS, EFFUSION)]:
        assert phi(train_targets, first, second) > 0.25  # strongly correlated in the ordinary splits
        assert abs(phi(decorrelated_targets, first, second)) < 0.06  # chance level: 2000 cases, s.e. ~0.022
    # Every pair is near independence, and the co-occurring pairs still meet often enough to be scored.
    correlation = np.corrcoef(decorrelated_targets[:, :NUM_DISEASES].T)
    assert np.abs(correlation[np.triu_indices(NUM_DISEASES, 1)]).max() < 0.08
    assert (diseases[:, EFFUSION] & diseases[:, CARDIOMEGALY]).sum() > 30
    assert (diseases[:, EFFUSION] & ~diseases[:, CARDIOMEGALY]).sum() > 200


def test_decorrelated_cases_have_a_box_for_every_disease_and_the_usual_rendering():
    for index in range(40):
        case = render_case(case_seed(1, "test-decorrelated", index), 64, decorrelated=True)
        present = set(np.flatnonzero(case.target[:NUM_DISEASES]).tolist())
        assert {box[0] for box in case.boxes} == present
        assert case.target[NO_FINDING] == (0.0 if present else 1.0)
    # Deterministic like every other split, and the cached prevalence it samples from cannot be altered.
    seed = case_seed(1, "test-decorrelated", 0)
    first, again = render_case(seed, 64, decorrelated=True), render_case(seed, 64, decorrelated=True)
    np.testing.assert_array_equal(first.image, again.image)
    assert first.boxes == again.boxes
    with pytest.raises(ValueError):
        disease_prevalence()[0] = 1.0
