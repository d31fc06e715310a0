"""Every bad input gets one clear message and a non-zero exit before any training step.

Each case runs the real command line (``main.main``) on a fixture broken in one way, checks the
exit status (2), the message on stderr, and that no run directory was left behind.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

import main
from test_sources import make_csv, make_nih, make_odir, write_png
from data import preflight

TINY = ["--backbone", "tiny", "--image-size", "64", "--prototype-dim", "16", "--prototypes-per-class", "2",
        "--epochs", "1", "--warmup-epochs", "1", "--push-epochs", "--batch-size", "2", "--no-pretrained",
        "--no-progress", "--decode-threads", "2"]


def run_cli(tmp_path, capsys, *arguments: str) -> str:
    """Run main.main; assert exit 2 and no run directory; return the error line."""
    out_dir = tmp_path / "run"
    code = main.main([*arguments, *TINY, "--out-dir", str(out_dir)])
    error = capsys.readouterr().err
    assert code == 2, error
    assert not out_dir.exists(), "a failed pre-flight check must not leave a run directory"
    lines = [line for line in error.splitlines() if " ERROR " in line]
    assert len(lines) == 1, error
    return lines[0]


def nih(tmp_path, *extra: str, **fixture) -> tuple[Path, list[str]]:
    root = make_nih(tmp_path / "nih", **fixture)
    return root, ["--preset", "nih", "--data-root", str(root), "--val-fraction", "0.25", *extra]


# ----------------------------------------------------------------------------------------------
# NIH
# ----------------------------------------------------------------------------------------------
def test_missing_data_root(tmp_path, capsys):
    message = run_cli(tmp_path, capsys, "--preset", "nih")
    assert "--preset nih needs --data-root" in message
    message = run_cli(tmp_path, capsys, "--preset", "nih", "--data-root", str(tmp_path / "nowhere"))
    assert "is not a folder" in message


def test_missing_label_file(tmp_path, capsys):
    root, args = nih(tmp_path)
    (root / "Data_Entry_2017.csv").unlink()
    message = run_cli(tmp_path, capsys, *args)
    assert "NIH: no label file in" in message and "(expected Data_Entry_2017.csv or Data_Entry_2017_v2020.csv)" in message


def test_missing_split_list(tmp_path, capsys):
    root, args = nih(tmp_path)
    (root / "test_list.txt").unlink()
    message = run_cli(tmp_path, capsys, *args)
    assert "NIH: no official split list in" in message and "(expected test_list.txt)" in message


def test_missing_column_is_named_with_its_file(tmp_path, capsys):
    root, args = nih(tmp_path)
    entry = root / "Data_Entry_2017.csv"
    entry.write_text(entry.read_text().replace("Finding Labels", "Findings", 1))
    message = run_cli(tmp_path, capsys, *args)
    assert "lacks the column 'Finding Labels'" in message and str(entry) in message


def test_unknown_label(tmp_path, capsys):
    root, args = nih(tmp_path)
    entry = root / "Data_Entry_2017.csv"
    entry.write_text(entry.read_text().replace("Cardiomegaly|Emphysema", "Cardiomegaly|Emphysemia"))
    message = run_cli(tmp_path, capsys, *args)
    assert "unknown labels" in message and "'Emphysemia' (1x)" in message and "Data_Entry_2017.csv" in message


def test_listed_image_without_label_row(tmp_path, capsys):
    root, args = nih(tmp_path)
    with (root / "test_list.txt").open("a") as stream:
        stream.write("99999999_000.png\n")
    message = run_cli(tmp_path, capsys, *args)
    assert "1 image of" in message and "without a row in Data_Entry_2017.csv (e.g. 99999999_000.png)" in message


def test_missing_images_are_counted_and_named(tmp_path, capsys):
    root, args = nih(tmp_path)
    for name in ("00000002_000.png", "00000004_000.png", "00000006_000.png"):
        (root / "images" / name).unlink()
    message = run_cli(tmp_path, capsys, *args)
    assert "3 of 13 images listed in" in message and "train_val_list.txt do not exist" in message
    assert "00000002_000.png" in message and "00000006_000.png" in message


def test_no_images_at_all(tmp_path, capsys):
    root, args = nih(tmp_path, images=False)
    message = run_cli(tmp_path, capsys, *args)
    assert "no PNG images" in message and "images_0NN/images" in message


@pytest.mark.parametrize("cache", ["--cache", "--no-cache"])
def test_corrupt_images_are_counted_and_named(tmp_path, capsys, cache):
    root, args = nih(tmp_path)
    broken = root / "images" / "00000003_000.png"
    broken.write_bytes(broken.read_bytes()[:60])  # truncated PNG
    (root / "images" / "00000005_000.png").write_text("not an image")
    message = run_cli(tmp_path, capsys, *args, cache)
    assert "2 of 13 images of" in message and "cannot be used" in message
    assert "00000003_000.png (corrupt or truncated, cannot be decoded)" in message and "00000005_000.png" in message
    if cache == "--cache":  # and no half cache was kept
        assert not any(path.suffix == ".json" and "train_val" in path.name for path in (root / ".cipl-cache").iterdir())


def test_splits_must_be_disjoint(tmp_path, capsys):
    root, args = nih(tmp_path)
    with (root / "test_list.txt").open("a") as stream:
        stream.write("00000001_000.png\n")
    message = run_cli(tmp_path, capsys, *args)
    assert "share 1 image (e.g. 00000001_000.png)" in message and "must be disjoint" in message


def test_empty_split(tmp_path, capsys):
    root, args = nih(tmp_path)
    (root / "test_list.txt").write_text("")
    assert "the test split is empty" in run_cli(tmp_path, capsys, *args)


def test_duplicate_list_entries(tmp_path, capsys):
    root, args = nih(tmp_path)
    with (root / "test_list.txt").open("a") as stream:
        stream.write("00000011_000.png\n")
    assert "lists 1 image more than once (e.g. 00000011_000.png)" in run_cli(tmp_path, capsys, *args)


def test_validation_fraction_out_of_range(tmp_path, capsys):
    _, args = nih(tmp_path)
    assert "--val-fraction 1.5 must be between 0 and 1" in run_cli(tmp_path, capsys, *args, "--val-fraction", "1.5")


def test_validation_needs_two_patients(tmp_path, capsys):
    rows = [("00000001_000.png", "Mass", 1), ("00000001_001.png", "No Finding", 1), ("00000010_000.png", "Mass", 10)]
    _, args = nih(tmp_path, rows=rows, boxes=False)
    assert "cannot carve a validation split" in run_cli(tmp_path, capsys, *args)


def test_image_size_must_be_sane(tmp_path, capsys):
    _, args = nih(tmp_path)
    out_dir = tmp_path / "run"
    code = main.main([*args, *TINY, "--image-size", "16", "--out-dir", str(out_dir)])
    assert code == 2 and not out_dir.exists()
    assert "--image-size 16 is not a usable training resolution" in capsys.readouterr().err


def test_thumbnail_images_are_refused(tmp_path, capsys):
    root, args = nih(tmp_path)
    write_png(root / "images" / "00000007_000.png", 16)
    message = run_cli(tmp_path, capsys, *args, "--no-cache")
    assert "00000007_000.png (16x16 px, smaller than 32 px)" in message


def test_box_file_with_unknown_label(tmp_path, capsys):
    root, args = nih(tmp_path)
    boxes = root / "BBox_List_2017.csv"
    boxes.write_text(boxes.read_text().replace("Atelectasis", "Atelectasia"))
    message = run_cli(tmp_path, capsys, *args)
    assert "unknown box labels" in message and "Atelectasia" in message and "BBox_List_2017.csv" in message


# ----------------------------------------------------------------------------------------------
# ODIR
# ----------------------------------------------------------------------------------------------
def odir_args(root: Path) -> list[str]:
    return ["--preset", "odir", "--data-root", str(root), "--val-fraction", "0.2"]


def test_odir_missing_keyword_column(tmp_path, capsys):
    root = make_odir(tmp_path / "odir")
    path = root / "Training Set" / "Annotation" / "training annotation (English).xlsx"
    pd.read_excel(path).drop(columns=["Left-Diagnostic Keywords"]).to_excel(path, index=False)
    message = run_cli(tmp_path, capsys, *odir_args(root))
    assert "lacks the column 'Left-Diagnostic Keywords'" in message and "training annotation (English).xlsx" in message


def test_odir_missing_test_annotation(tmp_path, capsys):
    root = make_odir(tmp_path / "odir")
    shutil.rmtree(root / "On-site Test Set" / "Annotation")
    message = run_cli(tmp_path, capsys, *odir_args(root))
    assert "no on-site annotation" in message and "on-site test annotation (English).xlsx" in message


def test_odir_missing_and_truncated_images(tmp_path, capsys):
    root = make_odir(tmp_path / "odir")
    (root / "Training Set" / "Images" / "3_left.jpg").unlink()
    message = run_cli(tmp_path, capsys, *odir_args(root))
    assert "1 of 19 images listed in" in message and str(root / "Training Set" / "Images" / "3_left.jpg") in message
    write_png(root / "Training Set" / "Images" / "3_left.jpg", 48, channels=3)
    cut = root / "Training Set" / "Images" / "5_right.jpg"
    cut.write_bytes(cut.read_bytes()[:-200])
    message = run_cli(tmp_path, capsys, *odir_args(root), "--no-cache")
    assert "5_right.jpg (truncated JPEG" in message


def test_odir_unknown_test_set_name(tmp_path, capsys):
    root = make_odir(tmp_path / "odir")
    assert "unknown set(s) onsite" in run_cli(tmp_path, capsys, *odir_args(root), "--odir-test-sets", "onsite")


# ----------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------
def csv_args(root: Path, *extra: str) -> list[str]:
    return ["--dataset", "csv", "--train-csv", str(root / "train.csv"), "--val-csv", str(root / "valid.csv"),
            "--test-csv", str(root / "test.csv"), "--image-root", str(root / "images"),
            "--cache-dir", str(root / "cache"), *extra]


def test_csv_needs_train_and_test_lists(tmp_path, capsys):
    assert "--dataset csv needs --train-csv and --test-csv" in run_cli(tmp_path, capsys, "--dataset", "csv")
    root = make_csv(tmp_path)
    args = csv_args(root, "--uncertain-label", "zero")
    args[args.index(str(root / "test.csv"))] = str(root / "tset.csv")
    assert f"file not found: {root / 'tset.csv'}" in run_cli(tmp_path, capsys, *args)


def test_csv_uncertain_labels_need_a_policy(tmp_path, capsys):
    root = make_csv(tmp_path)
    message = run_cli(tmp_path, capsys, *csv_args(root))
    assert "train.csv: 1 labels are -1 (uncertain); choose --uncertain-label zero or one" in message


def test_csv_label_values_must_be_binary(tmp_path, capsys):
    root = make_csv(tmp_path)
    (root / "valid.csv").write_text((root / "valid.csv").read_text().replace(",1.0,,", ",yes,,", 1))
    message = run_cli(tmp_path, capsys, *csv_args(root, "--uncertain-label", "zero"))
    assert "valid.csv: 1 label values are not 0/1, e.g. 'yes' in column 'Atelectasis' of row 2" in message


def test_csv_classes_missing_from_a_header(tmp_path, capsys):
    root = make_csv(tmp_path)
    message = run_cli(tmp_path, capsys, *csv_args(root, "--classes", "Atelectasis", "Edema", "Effusion", "--uncertain-label", "zero"))
    assert "train.csv lacks the column 'Edema'" in message
    test = root / "test.csv"
    test.write_text(test.read_text().replace("Cardiomegaly", "Cardiomegalia"))
    message = run_cli(tmp_path, capsys, *csv_args(root, "--uncertain-label", "zero"))
    assert "test.csv lacks the column 'Cardiomegaly'" in message


def test_csv_image_column_missing(tmp_path, capsys):
    root = make_csv(tmp_path)
    message = run_cli(tmp_path, capsys, *csv_args(root, "--image-column", "Image", "--uncertain-label", "zero"))
    assert "train.csv lacks the column 'Image'" in message and "'Path'" in message


def test_csv_unknown_pipe_label(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "train.csv").write_text("file,labels\na.png,Mass\nb.png,No Finding\nc.png,Mass\n")
    (tmp_path / "test.csv").write_text("file,labels\nd.png,Mass|Nodule\n")
    for name in "abcd":
        write_png(tmp_path / "img" / f"{name}.png", 40)
    args = ["--dataset", "csv", "--train-csv", str(tmp_path / "train.csv"), "--test-csv", str(tmp_path / "test.csv"),
            "--image-root", str(tmp_path / "img"), "--label-column", "labels", "--val-fraction", "0.34"]
    message = run_cli(tmp_path, capsys, *args)
    assert "unknown labels in" in message and "test.csv ('labels'): 'Nodule' (1x); known: Mass" in message


def test_unreadable_spreadsheet(tmp_path, capsys):
    root = make_odir(tmp_path / "odir")
    path = root / "Training Set" / "Annotation" / "training annotation (English).xlsx"
    path.write_bytes(b"PK\x03\x04 this is not a workbook")
    message = run_cli(tmp_path, capsys, *odir_args(root))
    assert f"cannot read {path}" in message


def test_offender_list_is_short():
    problems = [(f"img{i}.png", "reason") for i in range(9)]
    message = preflight.describe_offenders(problems, 100, "are bad")
    assert message.startswith("9 of 100 images are bad: img0.png (reason);") and message.endswith("... and 4 more")
    assert "img4.png" in message and "img5.png" not in message
