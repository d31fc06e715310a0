"""interpretable_reasoning.py: the numbers are the model's own, outputs are complete, bad input is refused;
and the run plots of utils/plots.py."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import interpretable_reasoning as reasoning
from conftest import tiny_config
from data.images import read_image
from datasets import EvalTransform, TransformedDataset, build_datasets
from model import CIPL, build_model, disease_probabilities
from test_sources import write_dicom
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.plots import write_roc, write_training_curves
from utils.projection import push_prototypes
from utils.visualise import UNSELECTIVE_TITLE_COLOUR, ReasoningBlock, ReasoningRow, reasoning_figure, save_png


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """A pushed tiny checkpoint, its config, datasets and model."""
    folder = tmp_path_factory.mktemp("reasoning")
    config = tiny_config(image_size=96)
    splits = build_datasets(config)
    torch.manual_seed(0)
    model = build_model(config).eval()
    for layer in model.add_on:
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.normal_(layer.weight, std=1.0)
    # A last layer that is not the class identity, off-class weights included: the decomposition must
    # still add up.
    model.last_layer.weight.data.add_(0.3 * torch.rand_like(model.last_layer.weight))
    records = push_prototypes(model, TransformedDataset(splits.train, EvalTransform(config.image_size)), "cpu",
                              progress=False, image_ids=splits.train.image_ids)
    path = folder / "pushed.pt"
    save_checkpoint(path, dict(model=model.state_dict(), config=config.to_dict(), class_names=model.class_names,
                               prototype_provenance=records, model_description=model.description()))
    return dict(path=path, config=config, splits=splits, model=model, folder=folder)


def test_contributions_sum_to_the_model_logits():
    torch.manual_seed(3)
    model = CIPL(["A", "B", "No Finding"], backbone="tiny", prototype_dim=8, prototypes_per_class=3).eval()
    model.last_layer.weight.data = torch.randn_like(model.last_layer.weight)  # any weights, any sign
    image = torch.randn(3, 64, 64)
    explanation = reasoning.explain(model, image)
    with torch.no_grad():
        logits = model(image[None]).logits[0].numpy()
    np.testing.assert_array_equal(explanation.logits, logits)  # the model's own numbers, not recomputed
    np.testing.assert_allclose(explanation.contributions.sum(axis=1), logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(explanation.contributions, explanation.weights * explanation.scores[None], rtol=1e-6)
    np.testing.assert_allclose(explanation.probabilities, 1 / (1 + np.exp(-(logits[:-1] - logits[-1]))), rtol=1e-5)


def run_reasoning(argv, capsys):
    capsys.readouterr()
    code = reasoning.main(argv)
    return code, capsys.readouterr().err


def test_reasoning_figure_and_json_carry_the_model_numbers(pushed, tmp_path, capsys):
    test = pushed["splits"].test
    index = next(i for i, boxes in test.boxes.items() if boxes)
    class_index = test.boxes[index][0][0]
    class_name = test.class_names[class_index]
    out = tmp_path / "figure"
    code, error = run_reasoning(["--checkpoint", str(pushed["path"]), "--image", test.image_ids[index],
                                 "--classes", f"{class_name},No Finding", "--rows", "1", "--out", str(out),
                                 "--no-progress"], capsys)
    assert code == 0, error
    assert (out / "reasoning.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((out / "reasoning.json").read_text())

    model = pushed["model"]
    with torch.no_grad():
        logits = model(EvalTransform(pushed["config"].image_size)(test.load_image(index))[None]).logits
    expected_probabilities = disease_probabilities(logits)[0]
    block, reference = record["classes"]
    assert block["class_name"] == class_name and reference["class_name"] == "No Finding"
    assert block["logit"] == pytest.approx(logits[0, class_index].item(), abs=1e-6)
    assert block["sum_of_contributions"] == pytest.approx(block["logit"], abs=1e-5)
    assert sum(p["contribution"] for p in block["prototypes"]) + block["other_classes_contribution"] == pytest.approx(block["logit"], abs=1e-5)
    assert block["probability"] == pytest.approx(expected_probabilities[class_index].item(), abs=1e-6)
    assert block["probability"] == pytest.approx(1 / (1 + np.exp(-(block["logit"] - block["no_finding_logit"]))), abs=1e-6)
    assert reference["probability"] is None
    assert [p["shown"] for p in block["prototypes"]] == [True] + [False] * (len(block["prototypes"]) - 1)
    similarities = [p["similarity"] for p in block["prototypes"]]
    assert similarities == sorted(similarities, reverse=True)
    assert block["ground_truth"] is True and len(block["ground_truth_boxes"]) >= 1
    assert record["probabilities"] == pytest.approx(dict(zip(test.disease_names, expected_probabilities.tolist())), abs=1e-6)
    assert all(p["unselective"] is None for p in block["prototypes"])  # this checkpoint was never tested


def test_reasoning_marks_the_prototypes_the_checkpoint_records_as_unselective(pushed, tmp_path, capsys, monkeypatch):
    test = pushed["splits"].test
    index = next(i for i, boxes in test.boxes.items() if boxes)
    class_name = test.class_names[test.boxes[index][0][0]]
    state = load_checkpoint(pushed["path"])
    own = [j for j, c in enumerate(pushed["model"].prototype_class.tolist()) if test.class_names[c] == class_name]
    flagged = own[-1]
    state.pop("path")
    save_checkpoint(tmp_path / "tested.pt", dict(state, unselective_prototypes=[flagged]))
    drawn = []
    monkeypatch.setattr(reasoning, "reasoning_figure", lambda **figure: drawn.append(figure) or reasoning_figure(**figure))
    out = tmp_path / "figure"
    code, error = run_reasoning(["--checkpoint", str(tmp_path / "tested.pt"), "--image", test.image_ids[index],
                                 "--classes", class_name, "--rows", str(len(own)), "--out", str(out), "--no-progress"],
                                capsys)
    assert code == 0, error
    block, = json.loads((out / "reasoning.json").read_text())["classes"]
    assert {p["prototype"]: p["unselective"] for p in block["prototypes"]} == {j: j == flagged for j in own}
    rows = drawn[0]["blocks"][0].rows  # and the figure's rows carry the same mark
    assert {row.prototype: row.unselective for row in rows} == {j: j == flagged for j in own}


def test_reasoning_figure_titles_an_unselective_prototype_in_red(tmp_path):
    picture = np.zeros((40, 40), np.uint8)
    rows = [ReasoningRow(prototype=j, similarity=0.9, weight=1.0, contribution=0.9, test_map=np.zeros((40, 40)),
                         test_box=(0, 0, 10, 10), patch=picture[:10, :10], source_id=f"img{j}", unselective=j == 4)
            for j in (3, 4)]
    block = ReasoningBlock(class_name="Mass", logit=1.8, reference_logit=0.0, probability=0.86, rows=rows,
                           hidden_count=0, hidden_contribution=0.0, other_classes_contribution=0.0, truth_boxes=[],
                           positive=None)
    figure = reasoning_figure(picture, "t", [block], {"Mass": 0.86}, tmp_path / "r.png")
    titles = {axis.get_title(): axis.title.get_color() for axis in figure.axes if "prototype" in axis.get_title()}
    assert titles == {"test image × prototype 3": "black", "prototype 4: matches all": UNSELECTIVE_TITLE_COLOUR}
    notes = [text for axis in figure.axes for text in axis.texts if text.get_color() == UNSELECTIVE_TITLE_COLOUR]
    assert len(notes) == 1 and "with and without Mass alike" in notes[0].get_text()


def test_predictions_for_a_folder_and_a_list(pushed, tmp_path, capsys):
    test = pushed["splits"].test
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        save_png(folder / f"case{i}.png", test.load_image(i))
    write_dicom(folder / "case3.dcm", test.load_image(3).astype(np.uint16) * 16, photometric="MONOCHROME2")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "predictions"
    code, error = run_reasoning(["--checkpoint", str(pushed["path"]), "--images", str(folder), "--out", str(out),
                                 "--no-progress"], capsys)
    assert code == 0, error
    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns) == ["image"] + test.disease_names
    assert table["image"].tolist() == ["case0.png", "case1.png", "case2.png", "case3.dcm"]  # DICOM read too
    transform = EvalTransform(pushed["config"].image_size)
    inputs = [transform(test.load_image(i)) for i in range(3)] + [transform(read_image(folder / "case3.dcm", 1))]
    with torch.no_grad():
        expected = disease_probabilities(pushed["model"](torch.stack(inputs)).logits)
    np.testing.assert_allclose(table[test.disease_names].to_numpy(), expected.numpy(), atol=1e-5)
    assert not (out / "reasoning.json").exists()

    listing = tmp_path / "list.csv"
    listing.write_text("path,comment\nimages/case2.png,x\nimages/case0.png,y\n")
    code, error = run_reasoning(["--checkpoint", str(pushed["path"]), "--images", str(listing), "--out",
                                 str(tmp_path / "listed"), "--no-progress"], capsys)
    assert code == 0, error
    listed = pd.read_csv(tmp_path / "listed" / "predictions.csv")
    assert listed["image"].tolist() == ["images/case2.png", "images/case0.png"]
    np.testing.assert_allclose(listed[test.disease_names].to_numpy(), expected.numpy()[[2, 0]], atol=1e-5)


def test_bad_input_gets_a_one_line_error_and_no_output(pushed, tmp_path, capsys):
    checkpoint = str(pushed["path"])
    image = tmp_path / "xray.png"
    save_png(image, pushed["splits"].test.load_image(0))
    out = tmp_path / "out"
    wrong_boxes = tmp_path / "boxes.csv"
    wrong_boxes.write_text("file,disease,left,top\nxray.png,Mass,1,2\n")
    not_cipl = tmp_path / "other.pt"
    torch.save({"model": {}}, not_cipl)
    cases = [
        (["--image", str(tmp_path / "missing.png")], "missing.png: no such file"),
        (["--image", "synthetic-test-99999"], "no such file, nor an image id"),
        (["--image", str(image), "--classes", "Effusion,Pneumonitis"], "unknown class 'Pneumonitis'"),
        (["--image", str(image), "--boxes", str(wrong_boxes)], "lacks the columns 'Image Index', 'Finding Label'"),
        (["--image", str(image), "--boxes", str(tmp_path / "nope.csv")], "not found"),
        (["--images", str(tmp_path / "nowhere")], "no such folder or CSV file"),
    ]
    for extra, message in cases:
        code, error = run_reasoning(["--checkpoint", checkpoint, "--out", str(out), *extra], capsys)
        assert code != 0 and message in error, (extra, error)
        assert error.count("\n") == 1, error
        assert not out.exists()
    code, error = run_reasoning(["--checkpoint", str(not_cipl), "--image", str(image), "--out", str(out)], capsys)
    assert code != 0 and "not a CIPL checkpoint" in error and not out.exists()

    unpushed = tmp_path / "unpushed.pt"
    model = build_model(pushed["config"])
    save_checkpoint(unpushed, dict(model=model.state_dict(), config=pushed["config"].to_dict(),
                                   class_names=model.class_names, model_description=model.description()))
    code, error = run_reasoning(["--checkpoint", str(unpushed), "--image", str(image), "--out", str(out)], capsys)
    assert code != 0 and "push.py" in error and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folders left behind"


def test_boxes_file_in_the_nih_layout_is_read(pushed, tmp_path, capsys):
    image = tmp_path / "00000001_000.png"
    save_png(image, pushed["splits"].test.load_image(0))
    boxes = tmp_path / "BBox_List_2017.csv"
    boxes.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                     "00000001_000.png,Mass,10.5,20,30,40,,\n"
                     "00000001_000.png,Nodule,1,2,3,4,,\n"
                     "00000002_000.png,Mass,5,6,7,8,,\n")
    out = tmp_path / "with-boxes"
    code, error = run_reasoning(["--checkpoint", str(pushed["path"]), "--image", str(image), "--boxes", str(boxes),
                                 "--classes", "Mass,Nodule", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, error
    record = json.loads((out / "reasoning.json").read_text())
    assert record["classes"][0]["ground_truth_boxes"] == [[10.5, 20.0, 30.0, 40.0]]
    assert record["classes"][1]["ground_truth_boxes"] == [[1.0, 2.0, 3.0, 4.0]]


def test_run_plots(tmp_path):
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, size=(40, 3)).astype(float)
    targets[:, 2] = 0  # one disease without positives: listed, not drawn
    probabilities = np.clip(targets * 0.5 + rng.random((40, 3)) * 0.6, 0, 1)
    assert write_roc(tmp_path / "roc.png", targets, probabilities, ["A", "B", "C"])
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert not write_roc(tmp_path / "none.png", np.zeros((5, 1)), np.zeros((5, 1)), ["A"])

    metrics = tmp_path / "metrics.csv"
    metrics.write_text("stage_index,stage,epoch,loss,classification,cross_image,val_mean_auc\n"
                       "0,warmup,0,1.2,0.9,,0.51\n1,paired,1,1.0,0.7,0.3,0.6\n2,push,1,,,,0.58\n")
    assert write_training_curves(tmp_path / "curves.png", metrics)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert not write_training_curves(tmp_path / "missing.png", tmp_path / "missing.csv")
    assert not (tmp_path / "missing.png").exists()
