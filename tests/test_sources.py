"""The real-data readers on fixtures written in the exact published formats (shared/DATASETS.md).

The fixture builders here are also used by tests/test_preflight.py and tests/test_image_cache.py.
Expected label vectors are written out by hand from the rows, not computed by the code under test.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from data.base import UnreadableImage
from data.images import image_frame, read_image
from data.odir import odir_eye_labels
from data.registry import build_datasets, dataset_scores
from data.tables import read_table
from datasets import DataError, class_names_for
from settings import preset_config

# ----------------------------------------------------------------------------------------------
# Fixture builders
# ----------------------------------------------------------------------------------------------
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
# (image, labels, patient): 12 patients; patients 1-9 are in train_val_list.txt, 10-12 in test_list.txt.
NIH_ROWS = [
    ("00000001_000.png", "Cardiomegaly|Emphysema", 1),
    ("00000001_001.png", "No Finding", 1),
    ("00000002_000.png", "Infiltration|Nodule|Pleural_Thickening", 2),
    ("00000003_000.png", "Hernia", 3),
    ("00000003_001.png", "Effusion|Pneumothorax|Atelectasis", 3),
    ("00000004_000.png", "Mass", 4),
    ("00000005_000.png", "Pneumonia|Consolidation|Edema", 5),
    ("00000005_001.png", "No Finding", 5),
    ("00000006_000.png", "Fibrosis", 6),
    ("00000007_000.png", "No Finding", 7),
    ("00000008_000.png", "Effusion", 8),
    ("00000009_000.png", "Cardiomegaly", 9),
    ("00000009_001.png", "No Finding", 9),
    ("00000010_000.png", "Infiltration", 10),
    ("00000010_001.png", "Atelectasis|Effusion", 10),
    ("00000011_000.png", "No Finding", 11),
    ("00000012_000.png", "Cardiomegaly|Mass", 12),
    ("00000012_001.png", "No Finding", 12),
]
NIH_TEST_PATIENTS = {10, 11, 12}


def write_png(path: Path, size: int = 64, seed: int = 0, channels: int = 1, width: int | None = None) -> None:
    rng = np.random.default_rng(seed)
    width = width or size
    ys, xs = np.mgrid[0:size, 0:width]
    base = (xs * 3 + ys * 2 + seed * 17) % 256
    image = np.clip(base + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8)
    if channels == 3:
        # Stored as OpenCV writes (B, G, R): red bright, blue dark, like a fundus photo.
        image = np.stack([image // 4, image // 2, image // 4 + 180], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def make_nih(root: Path, layout: str = "flat", entry_name: str = "Data_Entry_2017.csv", trailing_column: bool = True,
             rows=NIH_ROWS, size: int = 64, boxes: bool = True, images: bool = True) -> Path:
    """An NIH ChestX-ray14 folder as released (flat images/ or images_0NN/images/ mirror layout)."""
    root.mkdir(parents=True, exist_ok=True)
    end = "," if trailing_column else ""
    lines = [NIH_HEADER + end]
    for follow_up, (name, labels, patient) in enumerate(rows):
        lines.append(f"{name},{labels},{follow_up},{patient},{40 + patient},{'M' if patient % 2 else 'F'},PA,2682,2749,0.143,0.143{end}")
    (root / entry_name).write_text("\n".join(lines) + "\n")
    train_val = [name for name, _, patient in rows if patient not in NIH_TEST_PATIENTS]
    test = [name for name, _, patient in rows if patient in NIH_TEST_PATIENTS]
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    if images:
        for index, (name, _, _) in enumerate(rows):
            folder = root / "images" if layout == "flat" else root / f"images_{index % 3 + 1:03d}" / "images"
            write_png(folder / name, size, seed=index)
    if boxes:
        (root / "BBox_List_2017.csv").write_text(
            "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
            "00000010_000.png,Infiltrate,512,256,128,64,,,\n"
            "00000010_001.png,Atelectasis,100.5,200.25,300,150,,,\n"
            "00000010_001.png,Effusion,0,0,1024,1024,,,\n"
        )
    return root


ODIR_COLUMNS = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus",
                "Left-Diagnostic Keywords", "Right-Diagnostic Keywords", "N", "D", "G", "C", "A", "H", "M", "O"]
# (id, left keywords, right keywords): the full-width comma "，" separates keywords, as published.
ODIR_TRAIN = [
    (0, "cataract", "normal fundus"),
    (1, "moderate non proliferative retinopathy，lens dust", "normal fundus，low image quality"),
    (2, "low image quality", "suspected glaucoma，dry age-related macular degeneration"),
    (3, "pathological myopia", "laser spot，mild nonproliferative retinopathy"),
    (4, "hypertensive retinopathy，normal fundus", "normal fundus"),
    (5, "normal fundus", "proliferative vitreoretinopathy"),
    (6, "suspected cataract", "myopic maculopathy，anterior segment image"),
    (7, "normal fundus", "normal fundus"),
    (8, "wet age-related macular degeneration", "severe nonproliferative retinopathy"),
    (9, "normal fundus", "suspected diabetic retinopathy"),
]
ODIR_ONSITE = [
    (100, "normal fundus", "glaucoma"),
    (101, "mild nonproliferative retinopathy", "normal fundus"),
    (102, "cataract", "normal fundus"),
]
ODIR_OFFSITE = [
    (200, "normal fundus", "pathological myopia"),
    (201, "sever hypertension，lens dust", "normal fundus"),
]


def odir_frame(rows) -> pd.DataFrame:
    records = []
    for patient, left, right in rows:
        record = dict(zip(ODIR_COLUMNS, [patient, 50, "Female", f"{patient}_left.jpg", f"{patient}_right.jpg", left, right]))
        record.update({letter: 0 for letter in "NDGCAHMO"})
        records.append(record)
    return pd.DataFrame(records, columns=ODIR_COLUMNS)


def make_odir(root: Path, offsite_csv: bool = True, size: int = 48) -> Path:
    """OIA-ODIR as published: one folder per set with Annotation/*.xlsx and Images/*.jpg."""
    sets = [("Training Set", "training annotation (English)", ODIR_TRAIN, False),
            ("On-site Test Set", "on-site test annotation (English)", ODIR_ONSITE, False),
            ("Off-site Test Set", "off-site test annotation (English)", ODIR_OFFSITE, offsite_csv)]
    for seed, (folder, stem, rows, as_csv) in enumerate(sets):
        annotation = root / folder / "Annotation" / (stem + (".csv" if as_csv else ".xlsx"))
        annotation.parent.mkdir(parents=True, exist_ok=True)
        frame = odir_frame(rows)
        if as_csv:
            frame.to_csv(annotation, index=False)
        else:
            frame.to_excel(annotation, index=False)
        for patient, _, _ in rows:
            for side, offset in (("left", 0), ("right", 1)):
                path = root / folder / "Images" / f"{patient}_{side}.jpg"
                write_png(path, size, seed=patient * 2 + offset + seed, channels=3, width=size * 3 // 2)
    return root


def make_csv(root: Path, size: int = 48) -> Path:
    """A CheXpert-style one-column-per-class set: blanks, -1 (uncertain), a 'No Finding' column."""
    header = "Path,Sex,Age,Frontal/Lateral,No Finding,Atelectasis,Cardiomegaly,Effusion\n"
    train = [("p1/a.png", "Male", 60, "", "1.0", "", "-1.0"),
             ("p1/b.png", "Male", 60, "1.0", "", "0.0", ""),
             ("p2/a.png", "Female", 30, "", "", "1.0", "1.0"),
             ("p3/a.png", "Female", 45, "", "0.0", "", "1.0"),
             ("p4/a.png", "Male", 70, "1.0", "", "", ""),
             ("p5/a.png", "Male", 50, "", "1.0", "1.0", "")]
    val = [("p6/a.png", "Female", 33, "", "1.0", "", ""), ("p7/a.png", "Male", 61, "1.0", "", "", "")]
    test = [("p8/a.png", "Female", 41, "", "", "1.0", ""), ("p9/a.png", "Male", 52, "1.0", "", "", ""),
            ("p10/a.png", "Male", 52, "", "1.0", "", "1.0")]
    for name, rows in (("train.csv", train), ("valid.csv", val), ("test.csv", test)):
        lines = [f"{p},{s},{a},Frontal,{nf},{at},{ca},{ef}" for p, s, a, nf, at, ca, ef in rows]
        (root / name).write_text(header + "\n".join(lines) + "\n")
        for index, row in enumerate(rows):
            write_png(root / "images" / row[0], size, seed=index + len(name))
    return root


def nih_config(root: Path, **overrides):
    values = dict(data_root=str(root), image_size=64, backbone="tiny", prototype_dim=16, prototypes_per_class=2,
                  val_fraction=0.25, decode_threads=2)
    values.update(overrides)
    return preset_config("nih", **values)


def one_hot(names, class_names) -> list[float]:
    return [1.0 if name in names else 0.0 for name in class_names]


# ----------------------------------------------------------------------------------------------
# NIH ChestX-ray14
# ----------------------------------------------------------------------------------------------
def test_nih_labels_hand_checked(tmp_path):
    splits = build_datasets(nih_config(make_nih(tmp_path / "nih"), cache=False))
    assert splits.class_names == [
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
        "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia", "No Finding"]
    everything = {}
    for dataset in (splits.train, splits.val, splits.test):
        everything.update({image_id: dataset.targets[i].tolist() for i, image_id in enumerate(dataset.image_ids)})
    # Index:        0  1  2  3  4  5  6  7  8  9 10 11 12 13 NF
    expected = {
        "00000001_000.png": [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],  # Cardiomegaly|Emphysema
        "00000001_001.png": [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],  # No Finding
        "00000002_000.png": [0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0],  # Infiltration|Nodule|Pleural_Thickening
        "00000003_000.png": [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],  # Hernia
        "00000003_001.png": [1, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],  # Effusion|Pneumothorax|Atelectasis
        "00000005_000.png": [0, 0, 0, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 0],  # Pneumonia|Consolidation|Edema
        "00000012_000.png": [0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # Cardiomegaly|Mass
    }
    for image_id, vector in expected.items():
        assert everything[image_id] == vector, image_id
    assert splits.train.targets.dtype == np.float32
    assert sorted(splits.test.image_ids) == sorted(n for n, _, p in NIH_ROWS if p in NIH_TEST_PATIENTS)
    image = splits.train.load_image(0)
    assert image.dtype == np.uint8 and image.shape == (64, 64)


def test_nih_mirror_layout_v2020_without_trailing_column(tmp_path):
    root = make_nih(tmp_path / "nih", layout="split", entry_name="Data_Entry_2017_v2020.csv", trailing_column=False)
    assert (root / "images_002" / "images" / "00000001_001.png").is_file()
    splits = build_datasets(nih_config(root, cache=False))
    assert len(splits.train) + len(splits.val) + len(splits.test) == len(NIH_ROWS)
    index = splits.test.image_ids.index("00000012_000.png")
    assert splits.test.image_paths[index].parent.parent.name.startswith("images_0")
    assert splits.test.targets[index].tolist() == [0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]


def test_nih_header_quirks_are_parsed_as_pandas_sees_them(tmp_path):
    root = make_nih(tmp_path / "nih", images=False, boxes=False)
    frame = read_table(root / "Data_Entry_2017.csv")
    # The bracketed names split into extra columns and the trailing comma adds an unnamed one.
    assert "OriginalImage[Width" in frame.columns and "Height]" in frame.columns and frame.columns[-1].startswith("Unnamed")
    assert frame.loc[0, "Finding Labels"] == "Cardiomegaly|Emphysema" and frame.loc[0, "Patient ID"] == "1"


def test_nih_validation_is_patient_disjoint_and_seeded(tmp_path):
    root = make_nih(tmp_path / "nih")
    first = build_datasets(nih_config(root, cache=False, verify_images=False))
    again = build_datasets(nih_config(root, cache=False, verify_images=False))
    other = [build_datasets(nih_config(root, cache=False, verify_images=False, split_seed=s)).val.image_ids
             for s in (1, 2, 3)]
    assert first.val.image_ids == again.val.image_ids
    assert any(ids != first.val.image_ids for ids in other)
    assert not set(first.train.patient_ids) & set(first.val.patient_ids)
    assert not set(first.train.image_ids) & set(first.val.image_ids)
    assert len(set(first.val.patient_ids)) == 2  # round(0.25 x 9 patients)
    # The model seed does not move the validation split.
    assert build_datasets(nih_config(root, cache=False, verify_images=False, seed=7)).val.image_ids == first.val.image_ids


def test_nih_boxes_alias_and_frames(tmp_path):
    root = make_nih(tmp_path / "nih", size=64)
    raw = build_datasets(nih_config(root, cache=False)).test
    first, second = raw.image_ids.index("00000010_000.png"), raw.image_ids.index("00000010_001.png")
    scale = 64 / 1024  # the fixture's PNGs are 64 px; the box file is in 1024-px coordinates
    assert raw.boxes[first] == [(3, 512 * scale, 256 * scale, 128 * scale, 64 * scale)]  # Infiltrate -> Infiltration (3)
    assert raw.boxes[second] == [(0, 100.5 * scale, 200.25 * scale, 300 * scale, 150 * scale), (2, 0.0, 0.0, 64.0, 64.0)]
    cached = build_datasets(nih_config(root, cache_dir=str(tmp_path / "cache"))).test
    side = cached.load_image(second).shape[0]
    assert side == 68  # ceil(1.0625 x 64): the training resolution plus the crop margin
    assert cached.boxes[second][1] == pytest.approx((2, 0.0, 0.0, side, side))
    assert cached.boxes[first][0] == pytest.approx((3, 512 * side / 1024, 256 * side / 1024, 128 * side / 1024, 64 * side / 1024))


def test_class_names_for_without_loading_images(tmp_path):
    assert class_names_for(preset_config("nih"))[-1] == "No Finding" and len(class_names_for(preset_config("nih"))) == 15
    assert class_names_for(preset_config("odir")) == ["D", "G", "C", "A", "H", "M", "O", "N"]


# ----------------------------------------------------------------------------------------------
# ODIR
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keywords, expected", [
    ("normal fundus", {"N"}),
    ("cataract", {"C"}),
    ("moderate non proliferative retinopathy，lens dust", {"D"}),
    ("mild nonproliferative retinopathy", {"D"}),
    ("severe nonproliferative retinopathy", {"D"}),
    ("proliferative diabetic retinopathy", {"D"}),
    ("suspected diabetic retinopathy", {"D"}),
    ("suspected glaucoma，dry age-related macular degeneration", {"G", "A"}),
    ("wet age-related macular degeneration", {"A"}),
    ("mild hypertension", {"H"}),
    ("sever hypertension", {"H"}),
    ("myopia retinopathy，myopic retinopathy", {"M"}),
    ("suspected pathological myopia", {"M"}),
    ("hypertensive retinopathy，normal fundus", {"H"}),  # a diseased eye is not Normal
    ("laser spot，mild nonproliferative retinopathy", {"O", "D"}),
    ("proliferative vitreoretinopathy", {"O"}),
    ("normal fundus，low image quality", {"N"}),
    ("low image quality", set()),  # quality remarks only: the eye is dropped
    ("lens dust，optic disk photographically invisible，image offset，no fundus image", set()),
    ("anterior segment image", set()),
    (float("nan"), set()),
])
def test_odir_keywords(keywords, expected):
    assert odir_eye_labels(keywords) == expected


def test_odir_per_eye_vectors_hand_checked(tmp_path):
    root = make_odir(tmp_path / "odir")
    config = preset_config("odir", data_root=str(root), image_size=64, val_fraction=0.2, cache=False, decode_threads=2)
    splits = build_datasets(config)
    assert splits.class_names == ["D", "G", "C", "A", "H", "M", "O", "N"]
    targets = {}
    for dataset in (splits.train, splits.val):
        targets.update({image_id: dataset.targets[i].tolist() for i, image_id in enumerate(dataset.image_ids)})
    #            D  G  C  A  H  M  O  N
    expected = {
        "0_left.jpg": [0, 0, 1, 0, 0, 0, 0, 0],  # cataract
        "0_right.jpg": [0, 0, 0, 0, 0, 0, 0, 1],  # normal fundus
        "1_left.jpg": [1, 0, 0, 0, 0, 0, 0, 0],  # moderate non proliferative retinopathy，lens dust
        "1_right.jpg": [0, 0, 0, 0, 0, 0, 0, 1],  # normal fundus，low image quality
        "2_right.jpg": [0, 1, 0, 1, 0, 0, 0, 0],  # suspected glaucoma，dry age-related macular degeneration
        "3_right.jpg": [1, 0, 0, 0, 0, 0, 1, 0],  # laser spot，mild nonproliferative retinopathy
        "4_left.jpg": [0, 0, 0, 0, 1, 0, 0, 0],  # hypertensive retinopathy，normal fundus
        "6_right.jpg": [0, 0, 0, 0, 0, 1, 0, 0],  # myopic maculopathy，anterior segment image
    }
    for image_id, vector in expected.items():
        assert targets[image_id] == vector, image_id
    assert "2_left.jpg" not in targets  # "low image quality" only
    assert len(targets) == 2 * len(ODIR_TRAIN) - 1
    assert not set(splits.train.patient_ids) & set(splits.val.patient_ids)
    assert sorted(splits.test.image_ids) == sorted(f"{p}_{s}.jpg" for p, _, _ in ODIR_ONSITE for s in ("left", "right"))
    offsite = splits.extra_tests["offsite"]  # read from the CSV copy
    assert offsite.targets[offsite.image_ids.index("201_left.jpg")].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    assert offsite.targets[offsite.image_ids.index("200_right.jpg")].tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    image = splits.test.load_image(0)
    assert image.shape == (48, 72, 3) and image.dtype == np.uint8
    # RGB, not OpenCV's BGR: the fixture is red.
    assert image[..., 0].mean() > image[..., 2].mean() + 100


def test_odir_kaggle_full_df_copy(tmp_path):
    root = make_odir(tmp_path / "odir")
    train = root / "Training Set" / "Annotation" / "training annotation (English).xlsx"
    frame = pd.read_excel(train)
    # full_df.csv: one row per image (each patient twice) with extra per-eye columns.
    per_eye = pd.concat([frame.assign(filename=frame["Left-Fundus"]), frame.assign(filename=frame["Right-Fundus"])])
    per_eye.to_csv(root / "full_df.csv", index=False)
    config = preset_config("odir", data_root=str(root), train_csv=str(root / "full_df.csv"), image_size=64,
                           val_fraction=0.2, cache=False, verify_images=False)
    splits = build_datasets(config)
    assert len(splits.train) + len(splits.val) == 2 * len(ODIR_TRAIN) - 1


def test_odir_score_reported_for_odir_only():
    targets = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=np.float32)
    probabilities = np.array([[0.9, 0.2], [0.1, 0.8], [0.7, 0.6], [0.3, 0.4]])
    scores = dataset_scores(preset_config("odir"), "test", targets, probabilities)["odir_score"]
    # Every prediction is right at threshold 0.5: kappa = F1 = AUC = 1.
    assert scores == pytest.approx(dict(kappa=1.0, f1=1.0, auc=1.0, final=1.0))
    assert dataset_scores(preset_config("nih"), "test", targets, probabilities) == {}


# ----------------------------------------------------------------------------------------------
# CSV-described sets
# ----------------------------------------------------------------------------------------------
def csv_config(root: Path, **overrides):
    values = dict(dataset="csv", train_csv=str(root / "train.csv"), val_csv=str(root / "valid.csv"),
                  test_csv=str(root / "test.csv"), image_root=str(root / "images"), image_size=64,
                  cache=False, decode_threads=2)
    values.update(overrides)
    return preset_config("synthetic", **values)


def test_csv_one_column_per_class_hand_checked(tmp_path):
    root = make_csv(tmp_path)
    splits = build_datasets(csv_config(root, uncertain_label="zero"))
    # Classes from the header: the 0/1/-1/blank columns, No Finding excluded (it is derived) and last.
    assert splits.class_names == ["Atelectasis", "Cardiomegaly", "Effusion", "No Finding"]
    assert class_names_for(csv_config(root, uncertain_label="zero")) == splits.class_names
    #                                       At  Ca  Ef  NF
    assert splits.train.targets.tolist() == [[1, 0, 0, 0],   # 1.0, blank, -1.0 (uncertain -> zero)
                                             [0, 0, 0, 1],   # No Finding row: blank, 0.0, blank
                                             [0, 1, 1, 0],
                                             [0, 0, 1, 0],
                                             [0, 0, 0, 1],
                                             [1, 1, 0, 0]]
    assert build_datasets(csv_config(root, uncertain_label="one")).train.targets[0].tolist() == [1, 0, 1, 0]
    assert splits.test.targets.tolist() == [[0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 1, 0]]
    assert splits.val.image_ids == ["p6/a.png", "p7/a.png"]


def test_csv_pipe_labels_classes_order_and_boxes(tmp_path):
    (tmp_path / "img").mkdir()
    rows = [("a.png", "Mass|Nodule", "1"), ("b.png", "No Finding", "1"), ("c.png", "Nodule", "2"),
            ("d.png", "Effusion", "3"), ("e.png", "No Finding", "4"), ("f.png", "Mass", "5")]
    (tmp_path / "train.csv").write_text("Image Index,Finding Labels,Patient ID\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    (tmp_path / "test.csv").write_text("Image Index,Finding Labels,Patient ID\ng.png,Nodule|Effusion,9\nh.png,No Finding,9\n")
    for index, name in enumerate("abcdefgh"):
        write_png(tmp_path / "img" / f"{name}.png", 64, seed=index)
    (tmp_path / "boxes.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\ng.png,Nodule,8,16,4,2,,,\n")
    config = preset_config("synthetic", dataset="csv", train_csv=str(tmp_path / "train.csv"), test_csv=str(tmp_path / "test.csv"),
                           image_root=str(tmp_path / "img"), classes=("Nodule", "Mass", "Effusion"), boxes=str(tmp_path / "boxes.csv"),
                           val_fraction=0.2, image_size=64, cache=False)
    splits = build_datasets(config)
    assert splits.class_names == ["Nodule", "Mass", "Effusion", "No Finding"]
    #                                        No  Ma  Ef  NF
    assert splits.test.targets.tolist() == [[1, 0, 1, 0], [0, 0, 0, 1]]
    every = dict(zip(splits.train.image_ids + splits.val.image_ids, np.concatenate([splits.train.targets, splits.val.targets]).tolist()))
    assert every["a.png"] == [1, 1, 0, 0] and every["b.png"] == [0, 0, 0, 1] and every["d.png"] == [0, 0, 1, 0]
    assert splits.test.boxes == {0: [(0, 8.0, 16.0, 4.0, 2.0)]}  # in the image file's own pixels
    # Patient-disjoint: patient 1's two images stay together.
    assert ("a.png" in splits.val.image_ids) == ("b.png" in splits.val.image_ids)
    # Without --classes the classes come from the labels, sorted.
    plain = preset_config("synthetic", dataset="csv", train_csv=str(tmp_path / "train.csv"), test_csv=str(tmp_path / "test.csv"),
                          image_root=str(tmp_path / "img"))
    assert class_names_for(plain) == ["Effusion", "Mass", "Nodule", "No Finding"]


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME1", window=None, slope=1.0, intercept=0.0) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = window
    dataset.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)


def test_dicom_monochrome1_inverted_and_windowed(tmp_path):
    pixels = np.tile(np.array([0, 1000, 2000, 3000, 4095], dtype=np.uint16), (40, 8))  # 40 x 40
    write_dicom(tmp_path / "mono1.dcm", pixels, "MONOCHROME1", window=(2000, 2000))
    write_dicom(tmp_path / "mono2.dcm", pixels, "MONOCHROME2")
    windowed = read_image(tmp_path / "mono1.dcm", 1)
    # Window [1000, 3000]: 0 and 1000 -> 0, 2000 -> 128, 3000 and 4095 -> 255; then inverted (MONOCHROME1).
    assert windowed.dtype == np.uint8 and windowed.shape == (40, 40)
    assert windowed[0, :5].tolist() == [255, 255, 127, 0, 0]
    # No window: the full range, not inverted.
    assert read_image(tmp_path / "mono2.dcm", 1)[0, :5].tolist() == [0, 62, 125, 187, 255]
    assert image_frame(tmp_path / "mono1.dcm") == (40, 40)


def test_csv_reads_dicom_images(tmp_path):
    rows = []
    for index in range(6):
        pixels = ((np.arange(64 * 64).reshape(64, 64) * (index + 1)) % 4096).astype(np.uint16)
        write_dicom(tmp_path / "dcm" / f"{index}.dcm", pixels, "MONOCHROME1" if index % 2 else "MONOCHROME2")
        rows.append(f"dcm/{index}.dcm,{'Effusion' if index % 3 else 'No Finding'},{index}")
    (tmp_path / "train.csv").write_text("path,labels,patient_id\n" + "\n".join(rows[:4]) + "\n")
    (tmp_path / "test.csv").write_text("path,labels,patient_id\n" + "\n".join(rows[4:]) + "\n")
    config = preset_config("synthetic", dataset="csv", train_csv=str(tmp_path / "train.csv"), test_csv=str(tmp_path / "test.csv"),
                           label_column="labels", val_fraction=0.25, image_size=64, cache_dir=str(tmp_path / "cache"))
    splits = build_datasets(config)  # image root defaults to the CSV's folder; cached
    assert splits.class_names == ["Effusion", "No Finding"]
    assert splits.test.targets.tolist() == [[1, 0], [1, 0]]
    assert splits.test.load_image(0).shape == (68, 68)


# ----------------------------------------------------------------------------------------------
# Corrupt image found mid-epoch
# ----------------------------------------------------------------------------------------------
def test_corrupt_image_mid_epoch_names_its_path(tmp_path):
    from torch.utils.data import DataLoader

    from datasets import EvalTransform, TransformedDataset

    root = make_nih(tmp_path / "nih")
    splits = build_datasets(nih_config(root, cache=False, verify_images=False))
    broken = splits.test.image_paths[1]
    broken.write_bytes(broken.read_bytes()[:100])  # damaged after the pre-flight check
    with pytest.raises(UnreadableImage, match=broken.name):
        splits.test.load_image(1)
    batches = iter(DataLoader(TransformedDataset(splits.test, EvalTransform(64)), batch_size=2))
    with pytest.raises(DataError, match=str(broken)):
        next(batches)
    # A DataLoader worker process re-raises as ``type(error)(formatted message)``: that must still be
    # a DataError (one error line, exit 2) naming the path. (Spawning a real worker here costs 5 s.)
    try:
        splits.test.load_image(1)
    except DataError as error:
        rebuilt = type(error)(f"Caught {type(error).__name__} in DataLoader worker process 0.\n{error}")
    assert isinstance(rebuilt, DataError) and str(broken) in str(rebuilt)
    assert torch.is_tensor(TransformedDataset(splits.test, EvalTransform(64))[0]["image"])


def test_results_key_names_are_json_plain(tmp_path):
    root = make_odir(tmp_path / "odir")
    config = preset_config("odir", data_root=str(root), image_size=64, cache=False, verify_images=False,
                           odir_test_sets=("off-site", "on-site"))
    splits = build_datasets(config)
    assert sorted(splits.test.image_ids)[0] == "200_left.jpg" and list(splits.extra_tests) == ["onsite"]
    json.dumps(list(splits.extra_tests))


def test_csv_vindr_style_reader_rows_and_suffixless_dicom_ids(tmp_path):
    """VinDr-CXR's image_labels_train.csv: one row per radiologist, ids without '.dicom', 'No finding'."""
    header = "image_id,rad_id,Aortic enlargement,Cardiomegaly,Pleural effusion,No finding\n"
    train = ["aaa,R1,1,0,0,0", "aaa,R2,0,0,0,1", "aaa,R3,1,1,0,0",
             "bbb,R4,0,0,0,1", "bbb,R5,0,0,0,1", "bbb,R6,0,0,0,1",
             "ccc,R1,0,0,1,0", "ccc,R2,0,0,0,1", "ccc,R3,0,0,0,1",
             "ddd,R4,0,1,0,0", "ddd,R5,0,1,0,0", "ddd,R6,0,0,0,1"]
    test = ["eee,R8,0,1,1,0", "fff,R9,0,0,0,1"]
    for index, image_id in enumerate(["aaa", "bbb", "ccc", "ddd", "eee", "fff"]):
        folder = "test" if image_id in ("eee", "fff") else "train"
        write_dicom(tmp_path / "images" / folder / f"{image_id}.dicom", np.full((40, 40), 100 * index, np.uint16), "MONOCHROME2")
    (tmp_path / "image_labels_test.csv").write_text(header + "\n".join(f"test/{row}" for row in test) + "\n")
    (tmp_path / "image_labels_train.csv").write_text(header + "\n".join(f"train/{row}" for row in train) + "\n")
    config = preset_config("synthetic", dataset="csv", train_csv=str(tmp_path / "image_labels_train.csv"),
                           test_csv=str(tmp_path / "image_labels_test.csv"), image_root=str(tmp_path / "images"),
                           val_fraction=0.25, image_size=64, cache=False)
    splits = build_datasets(config)
    assert splits.class_names == ["Aortic enlargement", "Cardiomegaly", "Pleural effusion", "No Finding"]
    merged = dict(zip(splits.train.image_ids + splits.val.image_ids,
                      np.concatenate([splits.train.targets, splits.val.targets]).tolist()))
    #                                  AE Ca PE NF   (any reader positive)
    assert merged == {"train/aaa": [1, 1, 0, 0], "train/bbb": [0, 0, 0, 1],
                      "train/ccc": [0, 0, 1, 0], "train/ddd": [0, 1, 0, 0]}
    assert splits.test.targets.tolist() == [[0, 1, 1, 0], [0, 0, 0, 1]]
    assert splits.test.image_paths[0].name == "eee.dicom" and splits.test.load_image(0).shape == (40, 40)
