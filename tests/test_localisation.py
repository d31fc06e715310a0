"""Localisation: map -> box, IoU / IoBB / pointing game on hand-made cases, evidence maps, Grad-CAM of the
margin l_c - l_NF, the dataset evaluation, and results.json["localisation"] from main.py."""
import json

import numpy as np
import pytest
import torch

import main
from conftest import tiny_config
from datasets import MultiLabelDataset, build_datasets
from model import CIPL, CellGrid, build_model
from utils import localisation as loc
from utils.checkpoint import save_checkpoint
from utils.training import Trainer


# -- map -> box ------------------------------------------------------------------------------------
def two_blobs() -> np.ndarray:
    heat = np.zeros((20, 30))
    heat[2:6, 3:9] = 1.0  # rows 2-5, cols 3-8: holds the maximum
    heat[6, 9] = 0.7  # touches the blob's corner diagonally: same 8-connected component
    heat[10:16, 20:28] = 0.8  # a second, weaker blob
    return heat


def test_box_is_the_component_holding_the_maximum():
    boxes, peaks = loc.maps_to_boxes(two_blobs()[None], 0.5)
    assert boxes[0].tolist() == [3, 2, 7, 5]  # x 3..9, y 2..6 (diagonal neighbour included)
    assert peaks[0].tolist() == [2, 3]
    boxes, _ = loc.maps_to_boxes(two_blobs()[None], 0.75)  # the diagonal pixel (0.7) drops out
    assert boxes[0].tolist() == [3, 2, 6, 4]


def test_threshold_applies_to_the_min_max_normalised_map():
    heat = 10.0 + 10.0 * two_blobs()  # same shape, other scale and offset
    assert loc.maps_to_boxes(heat[None], 0.5)[0][0].tolist() == [3, 2, 7, 5]
    # The weaker blob wins once it holds the maximum.
    heat[12, 22] = 21.0  # normalised: blob A 10/11, blob B 8/11, this pixel 1
    assert loc.maps_to_boxes(heat[None], 0.5)[0][0].tolist() == [20, 10, 8, 6]


def test_flat_map_has_no_location():
    boxes, peaks = loc.maps_to_boxes(np.full((2, 8, 10), 0.3), 0.5)
    assert boxes.tolist() == [[0, 0, 10, 8]] * 2
    assert (peaks == -1).all()
    assert not loc.points_in_boxes(peaks, np.array([[0, 0, 10, 8]] * 2, dtype=float)).any()


def test_high_activation_box_is_the_95th_percentile_component():
    heat = np.arange(100, dtype=float).reshape(10, 10)  # 95th percentile 94.05: pixels 95..99
    assert loc.high_activation_boxes(heat[None])[0].tolist() == [5, 9, 5, 1]


def test_iou_iobb_and_pointing_on_known_boxes():
    predicted = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [2, 2, 4, 4]], dtype=float)
    truth = np.array([[5, 0, 10, 10], [20, 20, 5, 5], [0, 0, 10, 10]], dtype=float)
    np.testing.assert_allclose(loc.box_iou(predicted, truth), [50 / 150, 0, 16 / 100])
    np.testing.assert_allclose(loc.box_iobb(predicted, truth), [50 / 100, 0, 1.0])
    peaks = np.array([[4, 9], [4, 10], [-1, -1]])  # (row, col): pixel centres (9.5, 4.5), (10.5, 4.5)
    square = np.array([[0, 0, 10, 10]] * 3, dtype=float)
    assert loc.points_in_boxes(peaks, square).tolist() == [True, False, False]


def test_case_scores_take_the_best_of_several_boxes_and_summaries_average_classes():
    predicted = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 4, 4]], dtype=float)
    peaks = np.array([[1, 1], [1, 1], [1, 1], [1, 1]])
    # Case 0 has two boxes (two nodules): one poor, one exact. Case 1 misses, case 2 is partial.
    truth = np.array([[50, 50, 5, 5], [0, 0, 10, 10], [30, 30, 10, 10], [0, 0, 10, 5], [0, 0, 4, 4]], dtype=float)
    case_of_truth = np.array([0, 0, 1, 2, 3])
    scores = loc.score_cases(predicted, peaks, truth, case_of_truth)
    np.testing.assert_allclose(scores.iou, [1.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(scores.iobb, [1.0, 0.0, 0.5, 1.0])
    assert scores.hit.tolist() == [True, False, True, True]

    summary = loc.summarise(scores, np.array([0, 0, 0, 1]), ["A", "B", "No Finding"])
    a, b = summary["per_class"]["A"], summary["per_class"]["B"]
    assert a["cases"] == 3 and b["cases"] == 1
    assert a["iou_0.1"] == pytest.approx(2 / 3) and a["iou_0.5"] == pytest.approx(2 / 3) and a["iou_0.75"] == pytest.approx(1 / 3)
    assert a["pointing"] == pytest.approx(2 / 3) and a["mean_iou"] == pytest.approx(0.5)
    assert b["iou_0.75"] == 1.0
    # Means are over classes, not cases.
    assert summary["mean"]["iou_0.75"] == pytest.approx((1 / 3 + 1) / 2)
    assert summary["mean"]["classes"] == 2 and summary["mean"]["cases"] == 4


def test_peak_offset_is_measured_from_the_nearest_box_centre():
    boxes = np.zeros((4, 4))
    # Case 0: two boxes, centres (y, x) = (15, 15) and (45, 65); the peak (40, 60) is nearer the second.
    # Case 1: peak 8 px above and 4 px right of its box's centre (20, 30). Case 2: a flat map (no peak).
    # Case 3 (class B): integer peak (pixel index), read at the pixel's centre like the pointing game.
    truth = np.array([[10, 10, 10, 10], [60, 40, 10, 10], [25, 10, 10, 20], [0, 0, 8, 8], [0, 0, 4, 4]], dtype=float)
    case_of_truth = np.array([0, 0, 1, 2, 3])
    points = np.array([[40.0, 60.0], [12.0, 34.0], [np.nan, np.nan], [5.0, 1.0]])
    scores = loc.score_cases(boxes, points, truth, case_of_truth)
    np.testing.assert_allclose(scores.offset, [[-5, -5], [-8, 4], [np.nan, np.nan], [3, -1]])
    # The nearest box wins wherever it is listed: with case 0's two boxes swapped, the same offsets.
    swapped = loc.score_cases(boxes, points, truth[[1, 0, 2, 3, 4]], case_of_truth)
    np.testing.assert_allclose(swapped.offset, scores.offset)
    assert loc.score_cases(boxes[:0], points[:0], truth[:0], case_of_truth[:0]).offset.shape == (0, 2)
    integer = loc.score_cases(boxes[3:], np.array([[2, 0]]), truth[4:], np.array([0]))
    np.testing.assert_allclose(integer.offset, [[0.5, -1.5]])  # pixel (2, 0) -> (2.5, 0.5); centre (2, 2)

    summary = loc.summarise(scores, np.array([0, 0, 0, 1]), ["A", "B", "No Finding"])
    a, b = summary["per_class"]["A"], summary["per_class"]["B"]
    # Medians over the cases that have a peak: the flat map counts for the pointing game, not here.
    assert (a["peak_offset_y"], a["peak_offset_x"]) == (pytest.approx(-6.5), pytest.approx(-0.5))
    assert (b["peak_offset_y"], b["peak_offset_x"]) == (pytest.approx(3.0), pytest.approx(-1.0))
    assert summary["mean"]["peak_offset_y"] == pytest.approx((-6.5 + 3.0) / 2)
    table = loc.format_table(dict(threshold=0.5, cases=4, boxed_images=3, methods={"cipl": summary}))
    assert "peak dy" in table and "-6.5" in table and "+3.0" in table
    # The distance line averages each class's offset length, so B's offset does not cancel A's.
    distance = (np.hypot(6.5, 0.5) + np.hypot(3.0, 1.0)) / 2
    assert f"from its lesion (length of each class's peak dy, dx, mean over classes): CIPL {distance:.1f} px" in table
    # Read back from results.json, a class that never peaked has null offsets: left out, not a crash.
    summary["per_class"]["C"] = dict(summary["per_class"]["B"], peak_offset_y=None, peak_offset_x=None)
    assert loc.peak_distance(dict(methods={"cipl": summary}), "cipl") == pytest.approx(distance)


# -- maps from the model ---------------------------------------------------------------------------
def test_class_evidence_is_the_last_layer_weighted_sum_of_prototype_maps():
    torch.manual_seed(0)
    similarity = torch.rand(2, 6, 3, 4)
    weight = torch.rand(3, 6) * (torch.rand(3, 6) > 0.4)  # any pattern of weights, zeros included
    evidence = loc.class_evidence_maps(similarity, weight)
    for n in range(2):
        for c in range(3):
            expected = sum(weight[c, j] * similarity[n, j] for j in range(6))
            torch.testing.assert_close(evidence[n, c], expected)


def test_one_prototype_that_matches_everything_does_not_decide_the_map():
    """Seven prototypes peak on the lesion cell (2, 1); one matches every cell at 0.999. A max over the
    class's maps would follow the flat one (its value beats every peak); the weighted sum does not."""
    similarity = torch.full((1, 8, 4, 4), 0.9)
    similarity[0, :7, 2, 1] = 0.99
    similarity[0, 7] = 0.999
    similarity[0, 7, 0, 3] = 0.9995
    weight = torch.ones(1, 8)
    evidence = loc.class_evidence_maps(similarity, weight)[:, 0].numpy()
    np.testing.assert_allclose(loc.peak_points(evidence, 16), [[10.0, 6.0]])  # centre of cell (2, 1)
    np.testing.assert_allclose(loc.peak_points(similarity.max(dim=1).values.numpy(), 16), [[2.0, 14.0]])


def tiny_model(seed=0) -> CIPL:
    torch.manual_seed(seed)
    model = CIPL(["A", "B", "C", "No Finding"], backbone="tiny", prototype_dim=8, prototypes_per_class=2)
    for layer in model.add_on:  # spread the features so maps and gradients are not near-constant
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.normal_(layer.weight, std=1.0)
    return model.eval()


def test_cipl_maps_are_the_evidence_of_the_requested_class_at_feature_map_resolution():
    model = tiny_model()
    images = torch.randn(3, 3, 64, 64)
    classes = torch.tensor([0, 2, 1])
    model.last_layer.weight.data[1, 0] = 0.5  # an off-class weight counts with its value
    maps = loc.cipl_maps(model, images, classes)
    assert maps.shape == (3, 8, 8)  # the tiny backbone has stride 8
    with torch.no_grad():
        output = model(images)
    for i, c in enumerate(classes.tolist()):
        weight = model.last_layer.weight[c]
        expected = (weight[:, None, None] * output.similarity_maps[i]).sum(dim=0)
        torch.testing.assert_close(maps[i], expected)


# -- pointing game: the peak is located on the map itself --------------------------------------------
def test_pointing_peak_is_the_cell_centre_not_the_first_pixel_of_an_upsampled_plateau():
    coarse = np.zeros((1, 4, 4))
    coarse[0, 0, 1] = 1.0  # top row: bilinear upsampling makes rows 0..15 of the column band equal
    upsampled = loc.upsample_maps(torch.as_tensor(coarse), (128, 128)).numpy()
    _, first_in_raster = loc.maps_to_boxes(upsampled, 0.5)
    assert first_in_raster[0].tolist() == [0, 47]  # the old, defective answer: pixel row 0
    points = loc.peak_points(coarse, 128)
    np.testing.assert_allclose(points, [[16.0, 48.0]])  # centre of cell (0, 1): rows 0-31, cols 32-63
    # A lesion box over the cell's middle holds the centre but not pixel row 0.
    lesion = np.array([[40.0, 8.0, 16.0, 16.0]])
    assert loc.points_in_boxes(points, lesion).tolist() == [True]
    assert loc.points_in_boxes(first_in_raster, lesion).tolist() == [False]
    # The box is the component around that cell, and a flat map points nowhere.
    boxes, points = loc.localise(coarse, 128, 0.5)
    assert boxes[0, 0] < 48 < boxes[0, 0] + boxes[0, 2] and boxes[0, 1] == 0
    _, flat_points = loc.localise(np.full((1, 4, 4), 0.3), 128)
    assert np.isnan(flat_points).all() and not loc.points_in_boxes(flat_points, lesion).any()


def test_pointing_ties_between_cells_go_to_the_first_cell_and_rectangular_frames_scale_per_axis():
    coarse = np.zeros((1, 2, 4))
    coarse[0, 1, 2] = coarse[0, 1, 3] = 1.0
    np.testing.assert_allclose(loc.peak_points(coarse, (20, 80)), [[15.0, 50.0]])


def test_upsampling_without_a_grid_is_plain_resizing():
    torch.manual_seed(0)
    maps = torch.rand(3, 5, 7, dtype=torch.float64)
    expected = torch.nn.functional.interpolate(maps.unsqueeze(1), size=(40, 63), mode="bilinear", align_corners=False)
    torch.testing.assert_close(loc.upsample_maps(maps, (40, 63)), expected.squeeze(1))


def test_the_cell_grid_places_cells_where_their_receptive_fields_are_centred():
    """The tiny backbone's cell k looks at pixel 8k (its centre 8k + 0.5), not at the middle of the
    k-th 8-px slice: the upsampled map carries each cell's value at its own pixel, the peak is reported
    there, and a box over pixels 8k-ish holds it."""
    grid = CellGrid(first=0.5, step=8.0, frame=128)
    torch.manual_seed(0)
    maps = torch.rand(2, 16, 16, dtype=torch.float64)
    upsampled = loc.upsample_maps(maps, (128, 128), grid)
    torch.testing.assert_close(upsampled[:, ::8, ::8], maps)  # pixel 8k holds cell k exactly
    torch.testing.assert_close(upsampled[:, 4, 4], (maps[:, 0, 0] + maps[:, 0, 1] + maps[:, 1, 0] + maps[:, 1, 1]) / 4)
    torch.testing.assert_close(upsampled[:, 127, 127], maps[:, 15, 15])  # beyond the last centre: held
    # At twice the size (the 256-px source image of a radiograph the model saw at 128) everything
    # scales: cell k is centred at 1 + 16k, and a map linear in k is read back as (y - 1) / 16 there.
    ramp = torch.arange(16, dtype=torch.float64).view(1, 16, 1).expand(1, 16, 16)
    centres = torch.arange(256, dtype=torch.float64) + 0.5
    torch.testing.assert_close(loc.upsample_maps(ramp, (256, 256), grid)[0, :, 3], ((centres - 1) / 16).clamp(0, 15))
    coarse = np.zeros((1, 16, 16))
    coarse[0, 2, 5] = 1.0
    np.testing.assert_allclose(loc.peak_points(coarse, 128, grid), [[16.5, 40.5]])
    np.testing.assert_allclose(loc.peak_points(coarse, 128), [[20.0, 44.0]])  # equal slices: 3.5 px off
    lesion = np.array([[34.0, 12.0, 9.0, 7.0]])  # x 34-43, y 12-19
    assert loc.points_in_boxes(loc.peak_points(coarse, 128, grid), lesion).tolist() == [True]
    assert loc.points_in_boxes(loc.peak_points(coarse, 128), lesion).tolist() == [False]
    share = loc.cells_in_boxes(lesion, np.array([0]), 1, (16, 16), 128, grid)
    assert share.tolist() == [1 / 256]  # exactly one cell centre, (2, 5), lies in it


class SmallBoxImage(MultiLabelDataset):
    """One 128 x 128 image whose A box (x 35-43, y 12-19) holds pixel (16.5, 40.5), where the tiny
    backbone's cell (2, 5) is centred, but not (20, 44), the centre of that cell's equal slice."""

    def __init__(self):
        self.class_names = ["A", "B", "No Finding"]
        self.image_ids = ["one"]
        self.targets = np.array([[1, 0, 0]], dtype=np.float32)
        self.boxes = {0: [(0, 35.0, 12.0, 8.0, 7.0)]}

    def load_image(self, index):
        return np.zeros((128, 128), np.uint8)


def test_the_evaluation_scores_each_map_with_the_models_cell_grid(monkeypatch):
    def peaked(model, images, classes):
        maps = torch.zeros(len(images), 16, 16)
        maps[:, 2, 5] = 1.0
        return maps

    monkeypatch.setattr(loc, "cipl_maps", peaked)
    model = tiny_model()
    report = loc.evaluate_localisation(model, SmallBoxImage(), "cpu", 128, methods=("cipl",), progress=False)
    assert report["methods"]["cipl"]["mean"]["pointing"] == 1.0
    assert report["pointing_ceiling"]["mean"] == 1.0  # the box holds the centre of cell (2, 5)
    monkeypatch.setattr(model, "cell_grid", lambda size: CellGrid.equal_slices(16, size))
    report = loc.evaluate_localisation(model, SmallBoxImage(), "cpu", 128, methods=("cipl",), progress=False)
    assert report["methods"]["cipl"]["mean"]["pointing"] == 0.0  # (20, 44) lies outside the box


def reference_gradcam(model, images, classes):
    """Grad-CAM written out: gradient of l_c - l_NF at the backbone output, channel weights = spatial mean,
    ReLU of the weighted sum, min-max normalised the way pytorch_grad_cam does, at the layer's resolution."""
    activations = model.backbone(images)
    activations.retain_grad()
    logits = model.classify_features(model.add_on(model.top_layer(activations))).logits
    margin = logits[torch.arange(len(images)), classes] - logits[:, model.no_finding_index]
    margin.sum().backward()
    weights = activations.grad.mean(dim=(2, 3), keepdim=True)
    cams = torch.relu((weights * activations).sum(dim=1)).detach().numpy()
    result = []
    for cam in cams:
        cam = np.float32(cam - cam.min())
        cam = cam / (1e-7 + cam.max())
        cam = cam - cam.min()
        result.append(cam / (1e-7 + cam.max()))
    return np.stack(result)


def test_gradcam_explains_the_disease_margin_and_leaves_the_model_as_it_was():
    model = tiny_model(1)
    model.backbone.requires_grad_(False)  # as after a last-layer stage: Grad-CAM must still work
    model.train()
    images = torch.randn(2, 3, 64, 64)
    classes = torch.tensor([1, 0])
    maps = loc.gradcam_maps(model, images, classes).numpy()
    assert model.training and not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.add_on.parameters())
    assert all(p.grad is None for p in model.parameters())

    expected = reference_gradcam(tiny_model(1).eval(), images, classes)
    assert maps.shape == (2, 8, 8) and expected.max() > 0
    np.testing.assert_allclose(maps, expected, atol=1e-4)
    with pytest.raises(ValueError, match="No Finding"):
        loc.DiseaseMarginTarget(3, 3)


# -- evaluation over a dataset ---------------------------------------------------------------------
class BoxedImages(MultiLabelDataset):
    """Two 100 x 200 (H x W) images with integer boxes, for exact answers."""

    def __init__(self):
        self.class_names = ["A", "B", "No Finding"]
        self.image_ids = ["one", "two"]
        self.targets = np.array([[1, 1, 0], [0, 1, 0]], dtype=np.float32)
        self.boxes = {0: [(0, 40, 20, 80, 40), (1, 0, 0, 40, 20), (2, 0, 0, 8, 8)], 1: [(1, 100, 50, 40, 20)]}

    def load_image(self, index):
        return np.zeros((100, 200), np.uint8)


def test_boxes_are_scaled_into_the_model_frame_and_an_oracle_scores_perfectly(monkeypatch):
    dataset = BoxedImages()
    cases = loc.boxed_cases(dataset, 50)  # x scale 50/200, y scale 50/100; No Finding box skipped
    assert cases.image_index.tolist() == [0, 0, 1] and cases.class_index.tolist() == [0, 1, 1] and cases.skipped == 1
    np.testing.assert_allclose(cases.truth, [[10, 10, 20, 20], [0, 0, 10, 10], [25, 25, 10, 10]])

    truth_by_case = {i: cases.truth[cases.case_of_truth == i][0] for i in range(3)}
    calls = []

    def oracle(model, images, classes):
        start = sum(len(c) for c in calls)
        calls.append(classes.tolist())
        maps = torch.zeros(len(images), 50, 50)
        for row in range(len(images)):
            x, y, w, h = truth_by_case[start + row].astype(int)
            maps[row, y : y + h, x : x + w] = 1.0
        return maps

    monkeypatch.setattr(loc, "cipl_maps", oracle)
    model = tiny_model()
    monkeypatch.setattr(model, "cell_grid", lambda size: CellGrid.equal_slices(50, size))  # the oracle's cells are pixels
    # One image per batch: the second batch's cases must line up with their own ground truth.
    report = loc.evaluate_localisation(model, dataset, "cpu", 50, batch_size=1, methods=("cipl",), progress=False)
    assert calls == [[0, 1], [1]]
    assert report["cases"] == 3 and report["boxed_images"] == 2
    mean = report["methods"]["cipl"]["mean"]
    assert all(mean[key] == 1.0 for key in loc.SCORE_KEYS)
    assert report["methods"]["cipl"]["per_class"]["B"]["cases"] == 2


def test_evaluation_on_synthetic_boxes_covers_both_methods():
    config = tiny_config()
    test = build_datasets(config).test
    model = build_model(config).eval()
    report = loc.evaluate_localisation(model, test, "cpu", config.image_size, batch_size=16, progress=False)
    expected_cases = sum(len({b[0] for b in boxes}) for boxes in test.boxes.values())
    assert report["cases"] == expected_cases > 0
    assert set(report["methods"]) == {"cipl", "gradcam"}
    for result in report["methods"].values():
        assert sum(entry["cases"] for entry in result["per_class"].values()) == expected_cases
        for entry in list(result["per_class"].values()) + [result["mean"]]:
            assert all(0.0 <= entry[key] <= 1.0 for key in loc.SCORE_KEYS)
            # Accuracy can only fall as the bar rises.
            assert entry["iou_0.1"] >= entry["iou_0.25"] >= entry["iou_0.5"] >= entry["iou_0.75"]
    table = loc.format_table(report)
    assert "Grad-CAM" in table and "CIPL" in table and "IoBB>=0.5" in table


# -- main.py -------------------------------------------------------------------------------------
def test_main_reports_localisation_and_plots(tmp_path, capsys):
    config = tiny_config(tmp_path / "run")
    splits = build_datasets(config)
    model = build_model(config)
    trainer = Trainer(config, model, splits, torch.device("cpu"), progress=False)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.csv").write_text(
        "stage_index,stage,epoch,loss,classification,cluster,separation,val_mean_auc\n"
        "0,warmup,0,1.0,0.7,0.2,0.1,0.55\n1,push,0,,,,,0.57\n2,last_layer,0,0.8,0.6,0.15,0.05,0.6\n"
    )
    results = main.final_report(trainer, splits, run_dir, best={}, best_model=None)
    saved = json.loads((run_dir / "results.json").read_text())
    assert set(saved["localisation"]["methods"]) == {"cipl", "gradcam"}
    assert saved["localisation"]["threshold"] == config.localisation_threshold
    assert results["localisation"]["cases"] == saved["localisation"]["cases"] > 0
    for name in ("roc.png", "training_curves.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --eval-only: the same section, and the table printed from results.json.
    checkpoint = run_dir / "checkpoints" / "best.pt"
    save_checkpoint(checkpoint, dict(trainer.state_dict(), config=config.to_dict()))
    args = main.get_args_parser().parse_args(["--eval-only", "--checkpoint", str(checkpoint),
                                              "--out-dir", str(tmp_path / "eval"), "--no-progress"])
    eval_dir = main.evaluate_checkpoint(str(checkpoint), args, progress=False)
    evaluated = json.loads((eval_dir / "results.json").read_text())
    assert evaluated["localisation"]["methods"]["cipl"]["mean"] == saved["localisation"]["methods"]["cipl"]["mean"]
    assert (eval_dir / "roc.png").is_file() and (eval_dir / "training_curves.png").is_file()

    capsys.readouterr()
    assert loc.main([str(run_dir / "results.json"), str(eval_dir)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("Grad-CAM") >= 2 and "mean" in printed
    (tmp_path / "plain.json").write_text(json.dumps({"test": {}}))
    assert loc.main([str(tmp_path / "plain.json")]) == 2
    assert "no localisation results" in capsys.readouterr().err


def test_pointing_ceiling_asks_whether_any_cell_centre_lies_in_a_box():
    # 4 x 4 map on a 16-px frame: cell centres at 2, 6, 10, 14 on each axis.
    truth = np.array([[0, 0, 4, 4], [5, 5, 2, 2], [7, 7, 1, 1], [12.5, 0.5, 1, 1]], dtype=float)
    case_of_truth = np.array([0, 1, 2, 2])  # case 2 has two boxes, neither holds a centre
    reachable = loc.pointing_ceiling(truth, case_of_truth, 3, (4, 4), 16)
    assert reachable.tolist() == [True, True, False]


def test_a_random_cell_hits_a_case_with_the_share_of_cell_centres_in_its_boxes():
    # 4 x 4 map on a 16-px frame: cell centres at 2, 6, 10, 14 on each axis.
    truth = np.array([[0, 0, 8, 8],     # case 0: centres (2|6) x (2|6) -> 4 of 16
                      [0, 0, 16, 4],    # case 1: row 2 across the frame -> 4 of 16 ...
                      [0, 0, 4, 16],    # ... and column 2 down it -> 4 more, (2, 2) counted once: 7 of 16
                      [7, 7, 1, 1]], dtype=float)  # case 2: no centre
    case_of_truth = np.array([0, 1, 1, 2])
    share = loc.cells_in_boxes(truth, case_of_truth, 3, (4, 4), 16)
    np.testing.assert_allclose(share, [4 / 16, 7 / 16, 0.0])
    # Brute force: the pointing game of every one-hot map, averaged, is the same share.
    hits = np.zeros(3)
    for cell in range(16):
        maps = np.zeros((3, 4, 4))
        maps[:, cell // 4, cell % 4] = 1.0
        points = loc.peak_points(maps, 16)
        inside = loc.points_in_boxes(points[case_of_truth], truth)
        for case in range(3):
            hits[case] += inside[case_of_truth == case].any()
    np.testing.assert_allclose(hits / 16, share)
