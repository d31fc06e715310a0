"""External validation: a checkpoint evaluated on a CSV-described set of other images.

The external set is the run's own synthetic test split exported to PNG files (lossless), described
in the set's own words (other spellings, a disease missing, an extra label). Its AUCs, predictions
and localisation must therefore equal the model's on the test split itself, computed here directly.
"""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pandas as pd
import pytest

import main
from conftest import tiny_config
from datasets import build_datasets
from utils.checkpoint import load_checkpoint
from utils.external import parse_label_map
from utils.localisation import evaluate_localisation
from utils.metrics import per_class_auc
from utils.training import predict

# The set's own names for the model's diseases; Nodule is not annotated in it at all.
SET_NAMES = {"Atelectasis": "atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural effusion",
             "Mass": "Mass", "Pneumothorax": "Pneumo_thorax"}
LABEL_MAP = "Pleural effusion=Effusion,Pneumo_thorax=Pneumothorax"
EVALUATED = ["Atelectasis", "Cardiomegaly", "Effusion", "Mass", "Pneumothorax"]


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """A trained tiny run, the test split written out as an external set, and the expected numbers."""
    folder = tmp_path_factory.mktemp("external")
    config = tiny_config(folder / "run", max_stages=1)
    run_dir = main.train(config, progress=False)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(checkpoint)

    test = build_datasets(config).test
    images = folder / "images"
    images.mkdir()
    names, rows, box_rows = test.class_names, [], []
    for index, image_id in enumerate(test.image_ids):
        assert cv2.imwrite(str(images / f"{image_id}.png"), test.load_image(index))
        labels = [SET_NAMES[names[c]] for c in np.flatnonzero(test.targets[index, :-1]) if names[c] in SET_NAMES]
        rows.append(dict(file=f"{image_id}.png", findings="|".join(labels) or "No Finding"))
        for class_index, x, y, w, h in test.boxes.get(index, []):
            if names[class_index] in SET_NAMES:
                box_rows.append(f"{image_id}.png,{SET_NAMES[names[class_index]]},{x},{y},{w},{h},,,")
    pd.DataFrame(rows).to_csv(folder / "external.csv", index=False)
    (folder / "boxes.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" + "\n".join(box_rows) + "\n")

    # The expected numbers: the model on the test split itself, without Nodule.
    from model import build_model

    model = build_model(config, load_pretrained=False)
    model.load_state_dict(state["model"])
    probabilities, targets = predict(model, test, "cpu", config.image_size, config.eval_batch_size, progress=False)
    columns = [names.index(name) for name in EVALUATED]
    auc = per_class_auc(targets[:, columns], probabilities[:, columns], EVALUATED)
    nodule = names.index("Nodule")
    test.boxes = {i: [b for b in boxes if b[0] != nodule] for i, boxes in test.boxes.items()}
    test.boxes = {i: boxes for i, boxes in test.boxes.items() if boxes}
    localisation = evaluate_localisation(model, test, "cpu", config.image_size, config.localisation_threshold,
                                         config.eval_batch_size, layer=config.gradcam_layer, progress=False)
    return dict(folder=folder, run_dir=run_dir, checkpoint=checkpoint, test=test, probabilities=probabilities,
                auc=auc, localisation=localisation, config=config)


def flat(tree: dict, prefix: str = "") -> dict:
    """Nested dicts -> {"a/b/c": leaf}, for pytest.approx. NaN (no value, e.g. the peak offset of a
    class whose maps are all flat) becomes None, as results.json writes it."""
    items = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            items.update(flat(value, f"{prefix}{key}/"))
        else:
            items[f"{prefix}{key}"] = None if isinstance(value, float) and math.isnan(value) else value
    return items


def evaluate(external, out_name: str, *arguments: str) -> tuple[int, str]:
    folder = external["folder"]
    argv = ["--eval-only", "--checkpoint", str(external["checkpoint"]), "--image-root", str(folder / "images"),
            "--out-dir", str(folder / out_name), "--no-progress", *arguments]
    return main.main(argv), folder / out_name


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_external_set_gives_the_models_own_numbers(external, capsys):
    folder = external["folder"]
    code, out = evaluate(external, "eval", "--test-csv", str(folder / "external.csv"), "--label-column", "findings",
                         "--label-map", LABEL_MAP, "--boxes", str(folder / "boxes.csv"))
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == len(external["test"])
    assert results["missing_diseases"] == ["Nodule"]
    assert results["label_map"] == {"Pleural effusion": "Effusion", "Pneumo_thorax": "Pneumothorax"}
    assert results["ignored_labels"] == {}
    assert list(results["test"]["auc"]) == EVALUATED
    for name in EVALUATED:
        assert results["test"]["auc"][name] == pytest.approx(external["auc"]["auc"][name], abs=1e-6), name
    assert results["test"]["mean_auc"] == pytest.approx(external["auc"]["mean_auc"], abs=1e-6)
    # Localisation on the set's boxes, mapped onto the model's classes.
    assert results["localisation"]["cases"] == external["localisation"]["cases"] == 28
    assert flat(results["localisation"]["methods"]) == pytest.approx(flat(external["localisation"]["methods"]))

    # A box file that names the diseases as --label-map renames them gives the same localisation.
    renamed = folder / "boxes-model-names.csv"
    renamed.write_text((folder / "boxes.csv").read_text().replace(",Pleural effusion,", ",Effusion,"))
    assert ",Effusion," in renamed.read_text()
    code, out = evaluate(external, "eval-renamed-boxes", "--test-csv", str(folder / "external.csv"), "--label-column",
                         "findings", "--label-map", LABEL_MAP, "--boxes", str(renamed))
    assert code == 0, capsys.readouterr().err
    again = json.loads((out / "results.json").read_text())["localisation"]
    assert again["cases"] == 28 and flat(again["methods"]) == pytest.approx(flat(results["localisation"]["methods"]))

    predictions = pd.read_csv(out / "predictions.csv")
    disease_names = external["test"].disease_names
    assert list(predictions.columns) == ["image", *disease_names, "labels"]
    assert list(predictions["image"]) == [f"{image_id}.png" for image_id in external["test"].image_ids]
    np.testing.assert_allclose(predictions[disease_names].to_numpy(), external["probabilities"], atol=2e-6)
    targets = external["test"].targets
    first_positive = next(i for i in range(len(targets)) if targets[i, disease_names.index("Effusion")])
    assert "Effusion" in predictions["labels"][first_positive].split("|")  # the set's labels, renamed
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_labels_stop_the_evaluation_unless_ignored(external, capsys):
    folder = external["folder"]
    # One 0/1 column per class this time, with a label the model does not have.
    frame = pd.read_csv(folder / "external.csv")
    one_hot = pd.DataFrame({"file": frame["file"]})
    for set_name in SET_NAMES.values():
        one_hot[set_name] = [int(set_name in str(v).split("|")) for v in frame["findings"]]
    one_hot["Tuberculosis"] = [int(i % 5 == 0) for i in range(len(frame))]
    one_hot.to_csv(folder / "one-hot.csv", index=False)
    arguments = ["--test-csv", str(folder / "one-hot.csv"), "--label-map", LABEL_MAP]

    code, out = evaluate(external, "refused", *arguments)
    assert code == 2
    message = error_line(capsys)
    assert "labels the model has no class for: 'Tuberculosis' (7 images)" in message
    assert "--label-map OLD=NEW" in message and "--ignore-unknown-labels" in message
    assert not out.exists()

    code, out = evaluate(external, "ignored", *arguments, "--ignore-unknown-labels")
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["ignored_labels"] == {"Tuberculosis": 7}
    assert results["missing_diseases"] == ["Nodule"]
    assert results["test"]["mean_auc"] == pytest.approx(external["auc"]["mean_auc"], abs=1e-6)
    assert "localisation" not in results  # no --boxes


@pytest.mark.parametrize("arguments, message", [
    (["--label-map", "Pleural effusion"], "--label-map: 'Pleural effusion' is not OLD=NEW"),
    (["--label-map", "Efusion=Effusion"], "--label-map renames 'Efusion', which"),
    (["--prototype-dim", "32"], "--prototype-dim cannot change"),
    (["--eval-batch-size", "0"], "--eval-batch-size 0 must be a positive whole number"),
])
def test_bad_external_options_are_refused_before_anything_is_written(external, capsys, arguments, message):
    folder = external["folder"]
    code, out = evaluate(external, "bad", "--test-csv", str(folder / "external.csv"), "--label-column", "findings",
                         *arguments)
    assert code == 2
    assert message in error_line(capsys)
    assert not out.exists()


def test_a_resume_override_is_validated_too(external, capsys):
    run_dir = external["run_dir"]
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    assert main.main(["--resume", str(run_dir), "--num-workers", "-1", "--no-progress"]) == 2
    assert "--num-workers -1 must be 0 or more" in error_line(capsys)
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before


def test_label_map_parsing():
    assert parse_label_map(" Infiltrate=Infiltration , Pleural Effusion = Effusion,") == {
        "Infiltrate": "Infiltration", "Pleural Effusion": "Effusion"}
    assert parse_label_map("") == {}
    with pytest.raises(ValueError, match="renames 'A' twice"):
        parse_label_map("A=B,A=C")
    with pytest.raises(ValueError, match="is not OLD=NEW"):
        parse_label_map("=B")
