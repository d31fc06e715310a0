"""Prototype quality (utils/prototype_quality.py): diversity and collapse, selectivity and grounding on
hand-built examples whose answers are known, and the collapse warning after a push."""
import logging

import numpy as np
import pytest
import torch

from datasets import EvalTransform, MultiLabelDataset
from model import CIPL, CellGrid
from utils import prototype_quality as pq


# -- diversity and collapse --------------------------------------------------------------------------
def test_diversity_counts_distinct_images_and_cells_per_class():
    prototype_class = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    source_index = np.array([5, 6, 7, 8, 9, 10, 11, -1, 12, 12])  # prototype 7 not pushed; class 2 reuses image 12
    locations = np.array([[3, 2], [3, 2], [3, 2], [0, 1],  # class 0: three of four on cell (3, 2)
                          [0, 0], [1, 1], [2, 2], [0, 0],  # class 1: all different
                          [4, 4], [4, 5]])
    diversity = pq.prototype_diversity(prototype_class, source_index, locations, num_classes=4)
    assert diversity["prototypes"].tolist() == [4, 3, 2, 0]
    assert diversity["distinct_images"].tolist() == [4, 3, 1, 0]
    assert diversity["distinct_locations"].tolist() == [2, 3, 2, 0]
    assert diversity["most_on_one_location"].tolist() == [3, 1, 1, 0]
    np.testing.assert_allclose(diversity["largest_location_share"], [0.75, 1 / 3, 0.5, 0.0])
    # Collapse needs more than a quarter *and* at least two prototypes on one place.
    assert diversity["location_collapsed"].tolist() == [True, False, False, False]
    assert diversity["image_collapsed"].tolist() == [False, False, True, False]
    assert diversity["location_site"][0] in (0, 1, 2)
    assert diversity["image_site"][2] in (8, 9)


def model_with_provenance(locations, sources, per_class=4):
    model = CIPL(["A", "B", "No Finding"], backbone="tiny", prototype_dim=4, prototypes_per_class=per_class)
    model.prototype_source_index.copy_(torch.as_tensor(sources))
    model.prototype_source_location.copy_(torch.as_tensor(locations))
    return model


def test_collapse_warning_names_the_collapsed_class_and_stays_silent_for_a_healthy_model(caplog):
    healthy_cells = [[r, c] for r in range(3) for c in range(4)]
    sources = list(range(12))
    healthy = model_with_provenance(healthy_cells, sources)
    with caplog.at_level(logging.WARNING, logger="utils.prototype_quality"):
        pq.warn_if_collapsed(healthy, [f"img{i}" for i in range(20)])
    assert caplog.records == []

    collapsed_cells = [[r, c] for r in range(3) for c in range(4)]
    collapsed_cells[4:8] = [[3, 2], [3, 2], [3, 2], [0, 0]]  # class B: three of four on (3, 2)
    collapsed = model_with_provenance(collapsed_cells, sources)
    with caplog.at_level(logging.WARNING, logger="utils.prototype_quality"):
        diversity = pq.warn_if_collapsed(collapsed, [f"img{i}" for i in range(20)])
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "\n" not in message
    assert "B (3 of 4 on feature-map cell (3, 2))" in message and "A (" not in message
    assert diversity["location_collapsed"].tolist() == [False, True, False]

    # Three of A's four prototypes on one source image (push's fallback when a class runs out of images).
    caplog.clear()
    on_one_image = model_with_provenance(healthy_cells, [5, 5, 5, *range(6, 15)])
    with caplog.at_level(logging.WARNING, logger="utils.prototype_quality"):
        diversity = pq.warn_if_collapsed(on_one_image, [f"img{i}" for i in range(20)])
    assert len(caplog.records) == 1
    assert "A (3 of 4 on img5)" in caplog.records[0].getMessage() and "B (" not in caplog.records[0].getMessage()
    assert diversity["image_collapsed"].tolist() == [True, False, False]


def test_collapse_warning_says_how_many_piled_prototypes_lie_on_a_lesion_of_their_class(caplog):
    cells = [[r, c] for r in range(3) for c in range(4)]
    cells[4:8] = [[3, 2], [3, 2], [3, 2], [0, 0]]  # class B (prototypes 4-7): 4, 5 and 6 on (3, 2)
    collapsed = model_with_provenance(cells, list(range(12)))

    def grounding(evaluable, at_lesion):
        flags = dict(evaluable=np.zeros(12, bool), at_lesion=np.zeros(12, bool))
        flags["evaluable"][evaluable] = True
        flags["at_lesion"][at_lesion] = True
        return flags

    def warning(flags):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="utils.prototype_quality"):
            pq.warn_if_collapsed(collapsed, [f"img{i}" for i in range(20)], flags)
        assert len(caplog.records) == 1
        return caplog.records[0].getMessage()

    # A heart-like class: every piled prototype sits on a B box of its own image.
    assert "B (3 of 4 on feature-map cell (3, 2), 3 of those 3 inside a B box of their own image)" in \
        warning(grounding([4, 5, 6, 7], [4, 5, 6]))
    # Only one of them does; prototype 7 (another cell) and class A's prototypes do not count, not even
    # prototype 0, which sits on the same cell on a lesion (one of A's four there is no collapse).
    cells[0] = [3, 2]
    collapsed = model_with_provenance(cells, list(range(12)))
    assert "3 of 4 on feature-map cell (3, 2), 1 of those 3 inside a B box" in \
        warning(grounding([0, 1, 4, 5, 6, 7], [0, 1, 5, 7]))
    # Only two of the three source images have a B box (boxes for some images only): count among those.
    assert "3 of 4 on feature-map cell (3, 2), 1 of the 2 of those whose image has a B box inside one" in \
        warning(grounding([4, 5], [5]))
    # No box in any piled prototype's source image (NIH's training split): nothing to say, as before.
    message = warning(grounding([0, 7], [0, 7]))
    assert "B (3 of 4 on feature-map cell (3, 2))" in message and "inside" not in message


# -- selectivity -------------------------------------------------------------------------------------
def test_selectivity_is_mean_score_with_the_class_minus_without_on_a_known_case():
    scores = np.array([[0.9, 0.5], [0.7, 0.5], [0.2, 0.5], [0.4, 0.5]])  # prototype 1 fires on everything
    targets = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    np.testing.assert_allclose(pq.prototype_selectivity(scores, targets, np.array([0, 0])), [0.8 - 0.3, 0.0])
    # A class with no negatives has no selectivity.
    assert np.isnan(pq.prototype_selectivity(scores, np.ones((4, 2)), np.array([0, 1]))).all()


def test_selectivity_matches_a_loop_reference():
    rng = np.random.default_rng(0)
    scores = rng.random((30, 9))
    targets = (rng.random((30, 4)) < 0.4).astype(np.float32)
    prototype_class = rng.integers(0, 4, 9)
    expected = []
    for j in range(9):
        with_class = [scores[n, j] for n in range(30) if targets[n, prototype_class[j]] > 0.5]
        without = [scores[n, j] for n in range(30) if targets[n, prototype_class[j]] <= 0.5]
        expected.append(np.mean(with_class) - np.mean(without))
    np.testing.assert_allclose(pq.prototype_selectivity(scores, targets, prototype_class), expected)


def test_unselective_prototypes_are_named_by_class_and_no_finding_is_left_out(caplog):
    # Classes A, B, No Finding with three prototypes each; test images: two with A, one with B, one normal.
    prototype_class = np.repeat([0, 1, 2], 3)
    targets = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    scores = np.full((4, 9), 0.99)  # by default every prototype fires on everything
    scores[:, 1] = [0.9, 0.8, 0.3, 0.2]  # A's prototype 1: selective (0.85 - 0.25 = 0.6)
    scores[:, 2] = [0.9, 0.9, 0.86, 0.86]  # A's prototype 2: 0.04, just below the threshold
    scores[:, 3:6] = [[0.3] * 3, [0.3] * 3, [0.9] * 3, [0.3] * 3]  # all of B's selective
    selectivity = pq.prototype_selectivity(scores, targets, prototype_class)
    message = pq.unselective_message(selectivity, prototype_class, ["A", "B", "No Finding"], no_finding_index=2)
    assert message.startswith("2 of 6 disease prototypes match images with and without their class alike")
    assert "A 0, 2." in message and "B " not in message and "No Finding" not in message

    assert pq.unselective_message(selectivity[3:6], prototype_class[3:6], ["A", "B", "No Finding"], 2) is None
    # NaN (a class without negatives in the images) is not flagged.
    assert pq.unselective_message(np.full(9, np.nan), prototype_class, ["A", "B", "No Finding"], 2) is None

    model = model_with_provenance(np.arange(18).reshape(9, 2), np.arange(9), per_class=3)
    unboxed = TwoBoxImages()
    unboxed.boxes = {}  # selectivity needs no boxes
    with caplog.at_level(logging.WARNING, logger="utils.prototype_quality"):
        report = pq.evaluate_prototype_quality(model, unboxed, 50, "cpu", test_scores=scores, test_targets=targets)
    assert [r.getMessage() for r in caplog.records if "alike" in r.getMessage()] == [message]
    assert report["overall"]["unselective_prototypes"] == [0, 2]
    assert [report["per_class"][name].get("unselective") for name in ("A", "B", "No Finding")] == [2, 0, None]
    assert "(2 below 0.05)" in pq.format_quality(report)


# -- grounding ---------------------------------------------------------------------------------------
def test_grounding_scores_take_the_best_box_and_the_cell_centre():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 10, 10], [0, 0, 4, 4]], dtype=float)
    points = np.array([[5.0, 5.0], [50.0, 50.0], [2.0, 2.0]])
    truth = np.array([[40, 40, 5, 5], [0, 0, 10, 6], [0, 0, 100, 100]], dtype=float)
    owner = np.array([0, 0, 1])  # prototype 2 owns no box
    iobb, inside = pq.grounding_scores(boxes, points, truth, owner, 3)
    np.testing.assert_allclose(iobb, [0.6, 1.0, 0.0])
    assert inside.tolist() == [True, True, False]


class TwoBoxImages(MultiLabelDataset):
    """Images of 100 x 200 (H x W): image 0 has a large A box on the right, image 1 only a small B box."""

    def __init__(self):
        self.class_names = ["A", "B", "No Finding"]
        self.image_ids = ["zero", "one", "two"]
        self.targets = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=np.float32)
        self.boxes = {0: [(0, 80.0, 20.0, 120.0, 60.0)], 1: [(1, 50.0, 65.0, 20.0, 10.0)]}

    def load_image(self, index):
        return np.zeros((100, 200), np.uint8)


def test_grounding_on_hand_built_maps(monkeypatch):
    """Image frame 100 x 200 scaled to a 50 x 50 model frame; maps are 5 x 5 (cells of 10 x 10 px).
    Image 0's A box (x 80-200, y 20-80) becomes x 20-50, y 10-40: cells (1..3, 2..4). Image 1's B box
    (x 50-70, y 65-75) becomes x 12.5-17.5, y 32.5-37.5: the middle of cell (3, 1), much smaller than
    the high-activation box of a map peaked there, so it is not grounded although the prototype sits
    on it (at_lesion)."""
    model = CIPL(["A", "B", "No Finding"], backbone="tiny", prototype_dim=4, prototypes_per_class=2)
    # Prototypes 0, 1: A; 2, 3: B; 4, 5: No Finding. Prototype 1 sits on image 1, which has no A box.
    model.prototype_source_index.copy_(torch.tensor([0, 1, 1, 1, 2, 2]))
    model.prototype_source_location.copy_(torch.tensor([[2, 3], [0, 0], [3, 1], [4, 4], [1, 1], [3, 3]]))
    peaks = {0: (2, 3), 2: (3, 1), 3: (0, 4)}  # 0 and 2 light up their lesion, 3 lights up elsewhere

    def fake_maps(model, dataset, prototypes, image_size, device, batch_size=32):
        maps = torch.zeros(len(prototypes), 5, 5, dtype=torch.float64)
        for slot, prototype in enumerate(prototypes):
            row, col = peaks.get(int(prototype), (0, 0))
            maps[slot, row, col] = 1.0
        return maps, [dataset.load_image(int(model.prototype_source_index[p])).shape[:2] for p in prototypes]

    monkeypatch.setattr(pq, "source_similarity_maps", fake_maps)
    monkeypatch.setattr(model, "cell_grid", lambda size: CellGrid.equal_slices(5, size))  # cells of 10 x 10 px
    grounding = pq.prototype_grounding(model, TwoBoxImages(), 50, "cpu")
    assert grounding["evaluable"].tolist() == [True, False, True, True, False, False]  # NF never counts
    assert grounding["grounded"].tolist() == [True, False, False, False, False, False]
    assert grounding["at_lesion"].tolist() == [True, False, True, False, False, False]
    # A's box (30 x 30 = 900 px of 2500) can hold half of a 5% box (62.5 px); B's 5 x 5 box (25 px) cannot.
    assert grounding["reachable"].tolist() == [True, False, False, False, False, False]
    assert grounding["iobb"][0] == pytest.approx(1.0) and grounding["iobb"][3] == 0.0 and np.isnan(grounding["iobb"][1])
    assert 0.0 < grounding["iobb"][2] < 0.5

    report = pq.quality_report(model, pq.model_diversity(model), grounding, selectivity=None)
    assert report["per_class"]["A"]["grounded"] == 1.0 and report["per_class"]["A"]["grounding_evaluable"] == 1
    assert report["per_class"]["B"]["grounded"] == 0.0 and report["per_class"]["B"]["at_lesion"] == 0.5
    assert "grounded" not in report["per_class"]["No Finding"]
    assert report["overall"]["grounded"] == pytest.approx(1 / 3) and report["overall"]["at_lesion"] == pytest.approx(2 / 3)
    assert report["overall"]["grounding_reachable"] == pytest.approx(1 / 3)
    assert report["overall"]["distinct_images"] == 3 and report["overall"]["distinct_locations"] == 6
    # Worked through a few maps at a time (bounded memory), the answer is the same.
    chunked = pq.prototype_grounding(model, TwoBoxImages(), 50, "cpu", batch_size=2)
    for key in ("evaluable", "grounded", "at_lesion", "on_other_lesion", "reachable"):
        assert chunked[key].tolist() == grounding[key].tolist()
    np.testing.assert_array_equal(chunked["iobb"], grounding["iobb"])


def test_centre_cell_iobb_on_hand_built_features():
    """A 40 x 40 frame of 4 x 4 cells (10 px, centres at 5, 15, 25, 35). Image 0 has a distinct feature
    on the 2 x 2 block of cells (1..2, 1..2): a prototype copied from any of them lights up that block
    alone. Image 1 is uniform: a prototype from it matches the whole image, so its box is the image."""
    grid = CellGrid.equal_slices(4, 40)
    features = torch.zeros(2, 2, 4, 4)
    features[0, 0, 1:3, 1:3] = 1.0
    truth = np.array([
        [10.0, 10.0, 20.0, 20.0],  # the block's lesion, centred at (20, 20): halfway, so cell (2, 2)
        [12.0, 12.0, 6.0, 6.0],  # same centre cell, but a box much smaller than the lit block
        [0.0, 0.0, 20.0, 20.0],  # on image 1: the uniform image's box is the whole image, 400 of 1600 px
        [25.0, 0.0, 10.0, 10.0],  # a corner lesion on image 0: its cell (0, 3) matches all background cells
    ])
    iobb = pq.centre_cell_iobb(features, truth, np.array([0, 0, 1, 0]), grid, prototype_dim=2)
    # The lit block's map is 1 between the centres of its cells, 15..25 px: that 10 x 10 plateau is the
    # high-activation box (5 % of the frame is 80 px), inside the first lesion and 9 px of it in the second.
    assert iobb[0] == pytest.approx(1.0)
    assert iobb[1] == pytest.approx(9 / 100)
    assert iobb[2] == pytest.approx(400 / 1600)
    assert iobb[3] == pytest.approx(100 / 1600)  # background matches background: the box is the frame
    assert len(pq.centre_cell_iobb(features, np.zeros((0, 4)), np.zeros(0), grid, 2)) == 0


def test_centre_cell_is_the_nearest_cell_centre_where_the_grid_puts_it():
    """The tiny backbone's grid: cell k centred on pixel 10k + 0.5 here, not in the middle of the k-th
    slice. A lesion centred at (17, 17) lies in slice 1 but nearest to the centre of cell 2 (20.5).
    Only cell (2, 2) is distinct: copied from it, the prototype's 11 x 11 box at 15..26 px lies
    81 px of 121 inside the lesion (10..24 px); copied from cell (1, 1) it would match the whole
    background and its box would be the frame (IoBB 196 / 1600)."""
    grid = CellGrid(first=0.5, step=10.0, frame=40)
    features = torch.zeros(1, 2, 4, 4)
    features[0, 0, 2, 2] = 1.0
    iobb = pq.centre_cell_iobb(features, np.array([[10.0, 10.0, 14.0, 14.0]]), np.array([0]), grid, 2)
    assert iobb[0] == pytest.approx(81 / 121)


class MarkedTwoBoxImages(TwoBoxImages):
    """TwoBoxImages whose pixels say which image they are, so a stand-in network can tell them apart."""

    def load_image(self, index):
        return np.full((100, 200), 100 * index, np.uint8)


def test_centre_cell_grounding_per_class_and_in_the_report(monkeypatch):
    """As in test_grounding_on_hand_built_maps: a 50 x 50 frame of 5 x 5 cells. Image 0's A box covers
    cells rows 1..3, cols 2..4, and its features single out exactly those cells: grounded. Image 1's
    B box is a 5 x 5 px square in the middle of cell (3, 1) of a uniform image: not grounded."""
    model = CIPL(["A", "B", "No Finding"], backbone="tiny", prototype_dim=2, prototypes_per_class=2)
    lesion_features = torch.zeros(2, 5, 5)
    lesion_features[0, 1:4, 2:5] = 1.0

    def fake_features(images):  # image 0 is black, image 1 grey (normalised: about -2.1 and -0.4)
        grey = images[:, 0, 0, 0] > -1.0
        return torch.where(grey[:, None, None, None], torch.zeros(2, 5, 5), lesion_features)

    monkeypatch.setattr(model, "extract_features", fake_features)
    monkeypatch.setattr(model, "cell_grid", lambda size: CellGrid.equal_slices(5, size))
    centre = pq.centre_cell_grounding(model, MarkedTwoBoxImages(), 50, "cpu")
    assert centre["lesions"].tolist() == [1, 1, 0]
    assert centre["grounded"][:2].tolist() == [1.0, 0.0] and np.isnan(centre["grounded"][2])

    report = pq.quality_report(model, pq.model_diversity(model), None, None, centre)
    assert report["per_class"]["A"]["centre_cell_grounded"] == 1.0
    assert report["per_class"]["B"]["centre_cell_lesions"] == 1
    assert "centre_cell_grounded" not in report["per_class"]["No Finding"]
    assert report["overall"]["centre_cell_grounded"] == pytest.approx(0.5)
    assert "on each lesion's centre cell 0.500" in pq.format_quality(report)
    unboxed = MarkedTwoBoxImages()
    unboxed.boxes = {}
    assert pq.centre_cell_grounding(model, unboxed, 50, "cpu") is None
    one_at_a_time = pq.centre_cell_grounding(model, MarkedTwoBoxImages(), 50, "cpu", batch_size=1)
    np.testing.assert_array_equal(one_at_a_time["grounded"], centre["grounded"])


class CompanionImages:
    """One 50 x 50 image holding an A lesion (x 0-20, y 0-20) and a B lesion (x 10-50, y 10-50) that
    overlap in x, y 10-20: cells of 10 px, so cell (0, 0) is A's only, (1, 1) both, (4, 4) B's only."""
    boxes = {0: [(0, 0.0, 0.0, 20.0, 20.0), (1, 10.0, 10.0, 40.0, 40.0)]}

    def load_image(self, index):
        return np.zeros((50, 50), np.uint8)


def test_a_prototype_on_another_diseases_lesion_is_counted_only_off_its_own(monkeypatch):
    model = CIPL(["A", "B", "No Finding"], backbone="tiny", prototype_dim=4, prototypes_per_class=2)
    model.prototype_source_index.copy_(torch.zeros(6, dtype=torch.long))
    # A on its own lesion; A on B's lesion only; B on the overlap (its own counts first); B on A's lesion only.
    model.prototype_source_location.copy_(torch.tensor([[0, 0], [4, 4], [1, 1], [0, 0], [2, 2], [3, 3]]))
    monkeypatch.setattr(pq, "source_similarity_maps", lambda model, dataset, prototypes, *args, **kwargs: (
        torch.ones(len(prototypes), 5, 5, dtype=torch.float64), [(50, 50)] * len(prototypes)))
    monkeypatch.setattr(model, "cell_grid", lambda size: CellGrid.equal_slices(5, size))  # cells of 10 x 10 px
    grounding = pq.prototype_grounding(model, CompanionImages(), 50, "cpu")
    assert grounding["at_lesion"].tolist() == [True, False, True, False, False, False]
    assert grounding["on_other_lesion"].tolist() == [False, True, False, True, False, False]  # NF never counts
    report = pq.quality_report(model, pq.model_diversity(model), grounding, selectivity=None)
    assert report["per_class"]["A"]["on_other_lesion"] == 0.5 and report["overall"]["on_other_lesion"] == 0.5
    assert "on another disease's 0.500" in pq.format_quality(report)


def test_grounding_is_absent_without_boxes():
    dataset = TwoBoxImages()
    dataset.boxes = {}
    model = CIPL(["A", "B", "No Finding"], backbone="tiny", prototype_dim=4, prototypes_per_class=2)
    assert pq.prototype_grounding(model, dataset, 50, "cpu") is None


def test_source_similarity_maps_are_each_prototypes_map_on_its_own_image():
    torch.manual_seed(0)
    model = CIPL(["A", "B", "No Finding"], backbone="tiny", prototype_dim=4, prototypes_per_class=2).eval()
    dataset = TwoBoxImages()
    dataset.load_image = lambda index: (np.arange(100 * 200).reshape(100, 200) * (index + 1) % 251).astype(np.uint8)
    model.prototype_source_index.copy_(torch.tensor([1, 0, 2, 1, 0, 2]))
    maps, sizes = pq.source_similarity_maps(model, dataset, np.array([0, 1, 3]), 64, "cpu", batch_size=1)
    assert sizes == [(100, 200)] * 3  # the source images' own frames, for scaling their boxes
    with torch.no_grad():
        images = torch.stack([EvalTransform(64)(dataset.load_image(i)) for i in (1, 0, 1)])
        expected = model(images).similarity_maps[torch.arange(3), torch.tensor([0, 1, 3])].double()
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)


class SmallAndLargeBox:
    """Two 128 x 128 images. Image 0 has a small A box (x 35-43, y 12-19) that holds pixel
    (16.5, 40.5), where the tiny backbone's cell (2, 5) is centred, but not (20, 44), the centre of
    that cell's equal slice of the image. Image 1 has a B box around the high-activation region of a
    map peaked on that cell."""
    boxes = {0: [(0, 35.0, 12.0, 8.0, 7.0)], 1: [(1, 24.0, 0.0, 34.0, 34.0)]}

    def load_image(self, index):
        return np.zeros((128, 128), np.uint8)


def test_grounding_puts_the_pushed_cell_and_its_map_where_the_backbone_looks(monkeypatch):
    model = CIPL(["A", "B", "No Finding"], backbone="tiny", prototype_dim=4, prototypes_per_class=1)
    model.prototype_source_index.copy_(torch.tensor([0, 1, -1]))
    model.prototype_source_location.copy_(torch.tensor([[2, 5], [2, 5], [0, 0]]))
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    bump = torch.exp(-((rows - 2) ** 2 + (cols - 5) ** 2) / 4).double()  # peaked on cell (2, 5)
    monkeypatch.setattr(pq, "source_similarity_maps", lambda model, dataset, prototypes, *args, **kwargs: (
        bump.expand(len(prototypes), 16, 16), [(128, 128)] * len(prototypes)))
    placed = pq.prototype_grounding(model, SmallAndLargeBox(), 128, "cpu")
    monkeypatch.setattr(model, "cell_grid", lambda size: CellGrid.equal_slices(16, size))
    sliced = pq.prototype_grounding(model, SmallAndLargeBox(), 128, "cpu")
    assert placed["at_lesion"][0] and not sliced["at_lesion"][0]
    assert placed["iobb"][1] > 0.99 > sliced["iobb"][1]
