"""Readers for the real datasets: NIH ChestX-ray14, ODIR, and any multi-label set described by CSVs.

Each reader parses the files exactly as published (shared/DATASETS.md) into *pools*, one per image
list as shipped (NIH: ``train_val_list.txt`` and ``test_list.txt``; ODIR: one annotation file per
set; csv: one file per split). The train and validation splits are views on a pool (the validation
split is a patient-disjoint share of the training list, drawn with ``--split-seed``), so the image
cache (utils/image_cache.py), which works per pool, survives a new ``--val-fraction``.

:func:`build_datasets` then runs the pre-flight checks (utils/preflight.py) before any model
exists: required files and columns, known labels, non-empty and disjoint splits, every image
present and decodable. All problems are :class:`datasets.DataError` with the file and the reason.

Targets follow the project contract: float32 [N, K], the diseases in the source's order, then
"No Finding" last, which is 1 exactly when no disease is present. Boxes are (class, x, y, w, h) in
the pixel frame of ``load_image``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import pandas as pd

from datasets import Box, DataError, DataSplits, MultiLabelDataset
from utils import image_cache, preflight
from utils.metrics import odir_score
from utils.preflight import UnreadableImage, plural

logger = logging.getLogger(__name__)

NO_FINDING = "No Finding"
NIH_DISEASES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NIH_CLASS_NAMES: tuple[str, ...] = NIH_DISEASES + (NO_FINDING,)
NIH_BOX_FRAME = 1024  # BBox_List_2017.csv coordinates are in the 1024 x 1024 release PNGs
BOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}  # the box file's spelling -> the label file's

ODIR_DISEASES: tuple[str, ...] = ("D", "G", "C", "A", "H", "M", "O")
ODIR_CLASS_NAMES: tuple[str, ...] = ODIR_DISEASES + ("N",)  # N (normal) plays No Finding
ODIR_COLUMNS = ("ID", "Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords", "Right-Diagnostic Keywords")
ODIR_QUALITY_KEYWORDS = frozenset({
    "lens dust", "low image quality", "no fundus image", "image offset",
    "optic disk photographically invisible", "anterior segment image",
})
ODIR_KEYWORD_CLASSES = {
    "glaucoma": "G", "suspected glaucoma": "G",
    "cataract": "C", "suspected cataract": "C",
    "hypertensive retinopathy": "H", "mild hypertension": "H", "sever hypertension": "H", "severe hypertension": "H",
    "pathological myopia": "M", "suspected pathological myopia": "M", "myopia retinopathy": "M",
    "myopic retinopathy": "M", "myopic maculopathy": "M",
    "normal fundus": "N",
}
# "mild nonproliferative retinopathy", "moderate non proliferative retinopathy" (sic, with a space),
# "severe nonproliferative retinopathy", "proliferative diabetic retinopathy", "diabetic retinopathy",
# and "suspected ..." variants; "proliferative vitreoretinopathy" is not diabetic retinopathy.
ODIR_DIABETIC = re.compile(r"(non ?proliferative retinopathy|diabetic retinopathy)$")
ODIR_AMD = re.compile(r"age-related macular degeneration$")
ODIR_KEYWORD_SEPARATOR = re.compile(r"[，,]")  # the full-width comma (and, leniently, an ASCII one)
ODIR_ANNOTATION_NAMES = {
    # normalised file stem (lower case, letters and digits only) -> set
    "train": ("trainingannotationenglish", "odir5ktrainingannotationsupdatedv2", "odir5ktrainingannotations", "fulldf"),
    "on-site": ("onsitetestannotationenglish", "onsitetestannotation"),
    "off-site": ("offsitetestannotationenglish", "offsitetestannotation"),
}
PATIENT_COLUMNS = ("Patient ID", "patient_id", "PatientID", "patient", "Patient", "subject_id")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
TABLE_SUFFIXES = (".xlsx", ".xls", ".csv")


# ----------------------------------------------------------------------------------------------
# Reading images
# ----------------------------------------------------------------------------------------------
def read_image(path: Path | str, channels: int) -> np.ndarray:
    """uint8 [H, W] (channels 1) or [H, W, 3] RGB (channels 3); raises UnreadableImage naming the path.

    PNG/JPEG/BMP/TIFF go through OpenCV (8- or 16-bit, grey, RGB or RGBA), DICOM through pydicom.
    """
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        image = read_dicom(path)
    else:
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except FileNotFoundError:
            raise UnreadableImage(path, "file not found") from None
        except OSError as error:
            raise UnreadableImage(path, f"cannot read: {error.strerror or error}") from None
        if data.size == 0:
            raise UnreadableImage(path, "empty file")
        if path.suffix.lower() in (".jpg", ".jpeg") and not _jpeg_complete(data):
            raise UnreadableImage(path, "truncated JPEG (no end-of-image marker)")
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        if image is None:
            raise UnreadableImage(path, "corrupt or truncated, cannot be decoded")
        if image.ndim == 3:  # OpenCV decodes to BGR(A)
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return _as_channels(_to_uint8(image), channels)


def _jpeg_complete(data: np.ndarray) -> bool:
    # OpenCV decodes a cut-off JPEG into a half-grey image with only a warning on stderr. A complete
    # file ends with the EOI marker FF D9 (some writers add a few padding bytes after it).
    tail = data[-16:].tobytes()
    return b"\xff\xd9" in tail


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    # 16-bit PNG/TIFF exports of radiographs rarely use the full range: stretch what is used.
    image = image.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) * (255.0 / (high - low)) if high > low else np.zeros_like(image)
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def _as_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if channels == 1 and image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if channels == 3 and image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return image


def read_dicom(path: Path) -> np.ndarray:
    """A DICOM radiograph as 8-bit: modality LUT, then the file's VOI window (else the full pixel
    range), MONOCHROME1 inverted so that bone is bright as in every other format."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
    except FileNotFoundError:
        raise UnreadableImage(path, "file not found") from None
    except Exception as error:  # pydicom raises many types: invalid file, missing codec, ...
        raise UnreadableImage(path, f"cannot decode DICOM: {error}".splitlines()[0]) from None
    interpretation = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(dataset.get("SamplesPerPixel", 1))
    if samples == 1 and pixels.ndim == 3:  # multi-frame: the first frame
        pixels = pixels[0]
    if samples > 1:
        if pixels.ndim == 4:
            pixels = pixels[0]
        if interpretation.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, interpretation, "RGB")
        return _to_uint8(pixels)
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    window = _first_window(dataset)
    if window is not None:  # the window the modality chose for reading: [centre - width/2, centre + width/2]
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    else:
        if "VOILUTSequence" in dataset:
            values = np.asarray(apply_voi_lut(values, dataset, index=0), dtype=np.float64)
        low, high = float(values.min()), float(values.max())
    image = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    if interpretation == "MONOCHROME1":
        image = 255 - image
    return image


def _first_window(dataset) -> tuple[float, float] | None:
    """(centre, width) of the file's first VOI window, if it has a usable one."""
    if "WindowCenter" not in dataset or "WindowWidth" not in dataset:
        return None
    def first(value) -> float:  # a multi-valued attribute lists alternatives: take the first
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            value = value[0]
        return float(value)

    try:
        centre, width = first(dataset.WindowCenter), first(dataset.WindowWidth)
    except (TypeError, ValueError):
        return None
    return (centre, width) if width > 0 else None


def image_frame(path: Path) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        import pydicom

        header = pydicom.dcmread(path, stop_before_pixels=True)
        return int(header.Rows), int(header.Columns)
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as error:
        raise UnreadableImage(path, f"cannot read the image header: {error}") from None
    return height, width


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------
class FileImageDataset(MultiLabelDataset):
    """Images on disk with their multi-hot targets: one pool (an image list as published).

    ``channels`` is 1 (radiographs, read as grey) or 3 (fundus photos, RGB). Boxes may be declared
    in a fixed reference frame (NIH: 1024 px) and are moved into each file's own pixel frame by
    :meth:`fit_boxes_to_images` once the files are known to exist.
    """

    def __init__(self, name: str, source: str, image_paths: Sequence[Path], image_ids: Sequence[str],
                 targets: np.ndarray, class_names: Sequence[str], channels: int = 1,
                 patient_ids: Sequence[str] | None = None, boxes: dict[int, list[Box]] | None = None,
                 box_reference_size: int | None = None):
        self.name = name
        self.source = source  # where the list came from, for messages
        self.image_paths = [Path(path) for path in image_paths]
        self.image_ids = list(image_ids)
        self.targets = np.ascontiguousarray(targets, dtype=np.float32)
        self.class_names = list(class_names)
        self.channels = channels
        self.patient_ids = list(patient_ids) if patient_ids is not None else None
        self.boxes = boxes or {}
        self.box_reference_size = box_reference_size

    def load_image(self, index: int) -> np.ndarray:
        return read_image(self.image_paths[index], self.channels)

    def fit_boxes_to_images(self) -> None:
        if not self.box_reference_size or not self.boxes:
            return
        reference = float(self.box_reference_size)
        for index, boxes in self.boxes.items():
            height, width = image_frame(self.image_paths[index])
            scale_x, scale_y = width / reference, height / reference
            self.boxes[index] = [(c, x * scale_x, y * scale_y, w * scale_x, h * scale_y) for c, x, y, w, h in boxes]
        self.box_reference_size = None


class SubsetDataset(MultiLabelDataset):
    """A split that is part of a pool (train and validation carved from one training list)."""

    def __init__(self, parent: MultiLabelDataset, indices: Sequence[int], name: str):
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)
        self.name = name
        self.source = getattr(parent, "source", "")
        self.channels = getattr(parent, "channels", 1)
        self.image_ids = [parent.image_ids[i] for i in self.indices]
        self.image_paths = [parent.image_paths[i] for i in self.indices]
        parent_patients = getattr(parent, "patient_ids", None)
        self.patient_ids = [parent_patients[i] for i in self.indices] if parent_patients is not None else None
        self.targets = parent.targets[self.indices]
        self.class_names = list(parent.class_names)
        position = {int(parent_index): own for own, parent_index in enumerate(self.indices)}
        self.boxes = {position[i]: list(b) for i, b in parent.boxes.items() if i in position}

    def load_image(self, index: int) -> np.ndarray:
        return self.parent.load_image(int(self.indices[index]))


# ----------------------------------------------------------------------------------------------
# Labels and tables
# ----------------------------------------------------------------------------------------------
def multi_hot(label_sets: Sequence[Iterable[str]], diseases: Sequence[str], where: str,
              no_finding: str = NO_FINDING) -> np.ndarray:
    """Label-name sets -> float32 [N, C+1] with No Finding last (1 iff no disease).

    ``no_finding`` in a set is accepted and ignored (it is derived); any other name not in
    ``diseases`` raises, naming the label, how often it occurs and ``where``.
    """
    column = {name: index for index, name in enumerate(diseases)}
    targets = np.zeros((len(label_sets), len(diseases) + 1), dtype=np.float32)
    unknown: dict[str, int] = {}
    for row, labels in enumerate(label_sets):
        for label in labels:
            if label == no_finding:
                continue
            if label in column:
                targets[row, column[label]] = 1.0
            else:
                unknown[label] = unknown.get(label, 0) + 1
    if unknown:
        listed = ", ".join(f"{name!r} ({count}x)" for name, count in sorted(unknown.items(), key=lambda kv: -kv[1])[:8])
        raise DataError(f"unknown labels in {where}: {listed}; known: {', '.join(diseases)}")
    targets[:, -1] = targets[:, :-1].sum(axis=1) == 0
    return targets


def split_labels(value, separator: str = "|") -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return [part.strip() for part in str(value).split(separator) if part.strip()]


def is_no_finding(name: str) -> bool:
    """"No Finding", "No finding" (VinDr-CXR), "no_finding": the derived class, never a disease."""
    return name.strip().lower().replace("_", " ") == NO_FINDING.lower()


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or spreadsheet as strings, header names stripped, fully empty rows dropped."""
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        if path.suffix.lower() in (".xlsx", ".xls"):
            frame = pd.read_excel(path, dtype=str)
        else:
            frame = pd.read_csv(path, dtype=str, skipinitialspace=True)
    except Exception as error:  # pandas/openpyxl raise a zoo of types for a broken file
        raise DataError(f"cannot read {path}: {error}".splitlines()[0]) from None
    frame.columns = [str(name).strip() for name in frame.columns]
    return frame.dropna(how="all").reset_index(drop=True)


def require_columns(frame: pd.DataFrame, columns: Iterable[str], path: Path) -> None:
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise DataError(
            f"{path} lacks the column{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} "
            f"(it has: {', '.join(repr(c) for c in frame.columns[:20])})"
        )


def _origin_tag(*paths) -> str:
    """A short hash of where a pool came from, so caches of two datasets never collide."""
    return hashlib.sha256("\n".join(os.path.abspath(str(p)) for p in paths).encode()).hexdigest()[:8]


def _duplicates(values: Sequence[str]) -> list[str]:
    seen, repeated = set(), []
    for value in values:
        if value in seen:
            repeated.append(value)
        seen.add(value)
    return repeated


def _refuse_duplicates(values: Sequence[str], where: str) -> None:
    repeated = _duplicates(values)
    if repeated:
        raise DataError(f"{where} lists {plural(len(repeated), 'image')} more than once (e.g. {', '.join(repeated[:5])})")


# ----------------------------------------------------------------------------------------------
# Splitting
# ----------------------------------------------------------------------------------------------
def patient_disjoint_split(patient_ids: Sequence[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): a ``fraction`` of the patients, drawn with ``seed``,
    goes to validation with all their images. Deterministic in (patients, fraction, seed)."""
    patients = np.asarray([str(p) for p in patient_ids])
    unique = np.unique(patients)  # sorted: the draw does not depend on row order
    count = int(round(fraction * len(unique)))
    if len(unique) < 2 or count == 0 or count == len(unique):
        raise DataError(
            f"cannot carve a validation split of --val-fraction {fraction} from {len(unique)} patients: "
            f"each split needs at least one patient (give a validation list or another fraction)"
        )
    chosen = np.random.default_rng(seed).permutation(len(unique))[:count]
    is_val = np.isin(patients, unique[chosen])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


@dataclass
class Plan:
    """What a reader produced: pools, and each split as (pool name, indices or None for all)."""

    class_names: list[str]
    pools: dict[str, FileImageDataset]
    splits: dict[str, tuple[str, np.ndarray | None]]
    extra_tests: list[str] = field(default_factory=list)  # split names reported besides val/test
    carves_validation: bool = False


def _carve(plan_pools: dict, pool_name: str, patient_ids: Sequence[str], config) -> dict[str, tuple[str, np.ndarray]]:
    train, val = patient_disjoint_split(patient_ids, config.val_fraction, config.split_seed)
    logger.info("validation: %d of %d images of %s (patient-disjoint, fraction %.2f, split seed %d)",
                len(val), len(train) + len(val), plan_pools[pool_name].source, config.val_fraction, config.split_seed)
    return dict(train=(pool_name, train), val=(pool_name, val))


# ----------------------------------------------------------------------------------------------
# NIH ChestX-ray14
# ----------------------------------------------------------------------------------------------
def _nih_root(config) -> Path:
    if not config.data_root:
        raise DataError("--preset nih needs --data-root: the folder holding Data_Entry_2017.csv")
    root = Path(config.data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder")
    return root


def _nih_file(root: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    raise DataError(f"NIH: no {what} in {root} (expected {' or '.join(names)})")


def index_nih_images(root: Path) -> dict[str, Path]:
    """File name -> path for ``ROOT/images/*.png`` and ``ROOT/images_0NN/images/*.png``, as unpacked."""
    folders = [root / "images"] + sorted(p / "images" for p in root.glob("images_*") if p.is_dir())
    folders += sorted(p for p in root.glob("images_*") if p.is_dir() and not (p / "images").is_dir())
    index: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:  # one directory read; no stat per file
            for entry in entries:
                if entry.name.lower().endswith(".png"):
                    index.setdefault(entry.name, Path(entry.path))
    return index


def read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_box_file(path: Path, class_names: Sequence[str]) -> dict[str, list[Box]]:
    """The NIH BBox_List_2017.csv format -> image name -> [(class, x, y, w, h)] in the file's frame.

    Header ``Image Index,Finding Label,Bbox [x,y,w,h],,,``: pandas splits the bracketed name and
    names the trailing empty columns "Unnamed: N", so x, y, w, h are taken by position (2..5).
    """
    frame = read_table(path)
    require_columns(frame, ["Image Index", "Finding Label"], path)
    if frame.shape[1] < 6:
        raise DataError(f"{path} has {frame.shape[1]} columns; the box format needs Image Index, Finding Label, x, y, w, h")
    column = {name: index for index, name in enumerate(class_names[:-1])}
    aliases = {alias: name for alias, name in BOX_LABEL_ALIASES.items() if alias not in column and name in column}
    boxes: dict[str, list[Box]] = {}
    unknown, broken = set(), []
    for row_number, row in enumerate(frame.itertuples(index=False), start=2):
        image, label = str(row[0]).strip(), str(row[1]).strip()
        label = aliases.get(label, label)
        if label not in column:
            unknown.add(label)
            continue
        try:
            x, y, w, h = (float(value) for value in row[2:6])
        except (TypeError, ValueError):
            broken.append(row_number)
            continue
        if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
            broken.append(row_number)
            continue
        boxes.setdefault(image, []).append((column[label], x, y, w, h))
    if unknown:
        raise DataError(f"unknown box labels in {path}: {', '.join(sorted(unknown))}; known: {', '.join(class_names[:-1])}")
    if broken:
        raise DataError(f"{path}: {len(broken)} rows without a valid x, y, w, h (rows {', '.join(map(str, broken[:5]))})")
    return boxes


def _attach_boxes(pool: FileImageDataset, boxes: dict[str, list[Box]]) -> int:
    position = {image_id: index for index, image_id in enumerate(pool.image_ids)}
    by_name = {Path(image_id).name: index for index, image_id in enumerate(pool.image_ids)}
    attached = 0
    for image, image_boxes in boxes.items():
        index = position.get(image, by_name.get(Path(image).name))
        if index is not None:
            pool.boxes[index] = list(image_boxes)
            attached += len(image_boxes)
    return attached


def load_nih(config) -> Plan:
    root = _nih_root(config)
    entry_path = _nih_file(root, ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv"), "label file")
    entries = read_table(entry_path)
    require_columns(entries, ["Image Index", "Finding Labels", "Patient ID"], entry_path)
    entries["Image Index"] = entries["Image Index"].str.strip()
    _refuse_duplicates(list(entries["Image Index"]), str(entry_path))
    labels = dict(zip(entries["Image Index"], entries["Finding Labels"]))
    patients = dict(zip(entries["Image Index"], entries["Patient ID"].str.strip()))
    images = index_nih_images(root)
    if not images:
        raise DataError(f"NIH: no PNG images in {root}/images/ or {root}/images_0NN/images/ (unpack images_001.tar.gz ... images_012.tar.gz there)")

    pools = {}
    for pool_name, list_name in (("train_val", "train_val_list.txt"), ("test", "test_list.txt")):
        list_path = _nih_file(root, (list_name,), "official split list")
        names = read_list(list_path)
        _refuse_duplicates(names, str(list_path))
        unlisted = [name for name in names if name not in labels]
        if unlisted:
            raise DataError(f"{plural(len(unlisted), 'image')} of {list_path} without a row in {entry_path.name} (e.g. {', '.join(unlisted[:5])})")
        targets = multi_hot([split_labels(labels[name]) for name in names], NIH_DISEASES, f"{entry_path} ('Finding Labels')")
        pools[pool_name] = FileImageDataset(
            name=f"nih-{pool_name}-{_origin_tag(list_path)}", source=str(list_path),
            image_paths=[images.get(name, root / "images" / name) for name in names], image_ids=names,
            targets=targets, class_names=NIH_CLASS_NAMES, channels=1,
            patient_ids=[patients[name] for name in names], box_reference_size=NIH_BOX_FRAME,
        )
    box_path = root / "BBox_List_2017.csv"
    if box_path.is_file():
        boxes = read_box_file(box_path, NIH_CLASS_NAMES)
        attached = sum(_attach_boxes(pool, boxes) for pool in pools.values())
        logger.info("NIH: %d boxes on %d images from %s", attached, sum(len(p.boxes) for p in pools.values()), box_path.name)
    splits = _carve(pools, "train_val", pools["train_val"].patient_ids, config)
    splits["test"] = ("test", None)
    return Plan(list(NIH_CLASS_NAMES), pools, splits, carves_validation=True)


# ----------------------------------------------------------------------------------------------
# ODIR
# ----------------------------------------------------------------------------------------------
def odir_keyword_class(keyword: str) -> str | None:
    """One diagnostic keyword -> its class letter; None for image-quality keywords."""
    keyword = " ".join(keyword.strip().lower().split())
    if not keyword or keyword in ODIR_QUALITY_KEYWORDS:
        return None
    if keyword in ODIR_KEYWORD_CLASSES:
        return ODIR_KEYWORD_CLASSES[keyword]
    if ODIR_DIABETIC.search(keyword):
        return "D"
    if ODIR_AMD.search(keyword):
        return "A"
    return "O"


def odir_eye_labels(keywords) -> set[str]:
    """One eye's keyword cell -> its classes (DATASETS.md): an eye with a disease is not Normal;
    an empty set means the eye carries no label (only quality remarks) and is dropped."""
    if keywords is None or (isinstance(keywords, float) and np.isnan(keywords)):
        return set()
    classes = {odir_keyword_class(part) for part in ODIR_KEYWORD_SEPARATOR.split(str(keywords))}
    classes.discard(None)
    if classes - {"N"}:
        classes.discard("N")
    return classes


def _normalised_stem(path: Path) -> str:
    return re.sub(r"[^a-z0-9]", "", path.stem.lower())


def find_odir_annotation(root: Path, kind: str) -> Path | None:
    wanted = ODIR_ANNOTATION_NAMES[kind]
    found = [p for p in root.rglob("*") if p.suffix.lower() in TABLE_SUFFIXES and _normalised_stem(p) in wanted
             and ".cipl-cache" not in p.parts]
    # The spreadsheet as published beats a CSV copy; then the shallowest.
    found.sort(key=lambda p: (p.suffix.lower() == ".csv", len(p.parts), str(p)))
    return found[0] if found else None


def index_images(root: Path) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for directory, folders, files in os.walk(root):
        folders[:] = [f for f in folders if f != ".cipl-cache"]
        for name in files:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                index.setdefault(name, []).append(Path(directory) / name)
    return index


def _nearest(candidates: list[Path], anchor: Path) -> Path:
    """Of several files with one name (an image in two ODIR sets), the one nearest the annotation."""
    def shared(path: Path) -> int:
        return len(os.path.commonpath([str(path), str(anchor)]))
    return max(candidates, key=lambda p: (shared(p), -len(str(p))))


def read_odir_annotation(path: Path, images: dict[str, list[Path]], pool_name: str) -> FileImageDataset:
    frame = read_table(path)
    require_columns(frame, ODIR_COLUMNS, path)
    frame["ID"] = frame["ID"].astype(str).str.strip()
    frame = frame.drop_duplicates(subset="ID")  # the Kaggle full_df.csv repeats each patient per eye
    paths, image_ids, patients, label_sets, dropped = [], [], [], [], 0
    missing = []
    for row in frame.itertuples(index=False):
        record = dict(zip(frame.columns, row))
        for side in ("Left", "Right"):
            file_name = str(record[f"{side}-Fundus"]).strip()
            classes = odir_eye_labels(record[f"{side}-Diagnostic Keywords"])
            if not classes:
                dropped += 1
                continue
            candidates = images.get(file_name)
            if not candidates:
                missing.append(len(paths))
            paths.append(_nearest(candidates, path.parent) if candidates else Path(file_name))
            image_ids.append(file_name)
            patients.append(record["ID"])
            label_sets.append(classes)
    if missing:  # report them where this set's other images are (the existence check names them)
        found = [paths[i].parent for i in range(len(paths)) if i not in set(missing)]
        home = max(set(found), key=found.count) if found else path.parent
        for i in missing:
            paths[i] = home / paths[i]
    _refuse_duplicates(image_ids, str(path))
    targets = multi_hot(label_sets, ODIR_DISEASES, str(path), no_finding="N")
    logger.info("ODIR %s: %d eyes from %d patients (%d eyes without a diagnosis dropped)",
                path.name, len(image_ids), len(frame), dropped)
    _compare_with_patient_labels(frame, image_ids, patients, targets, path)
    return FileImageDataset(
        name=f"odir-{pool_name}-{_origin_tag(path)}", source=str(path), image_paths=paths, image_ids=image_ids,
        targets=targets, class_names=ODIR_CLASS_NAMES, channels=3, patient_ids=patients,
    )


def _compare_with_patient_labels(frame, image_ids, patients, targets, path) -> None:
    """The per-patient N..O columns should be the union of the two eyes; report disagreements."""
    letters = [c for c in ODIR_CLASS_NAMES if c in frame.columns]
    if len(letters) < len(ODIR_CLASS_NAMES):
        return
    union: dict[str, np.ndarray] = {}
    for patient, target in zip(patients, targets):
        union[patient] = np.maximum(union.get(patient, 0), target)
    disagree = 0
    for row in frame.itertuples(index=False):
        record = dict(zip(frame.columns, row))
        if record["ID"] not in union:
            continue
        eyes = union[record["ID"]].copy()
        eyes[-1] = float(eyes[:-1].sum() == 0)
        try:
            given = np.array([float(record[c]) for c in ODIR_CLASS_NAMES])
        except (TypeError, ValueError):
            continue
        disagree += int(not np.array_equal(given, eyes))
    if disagree:
        logger.info("ODIR %s: %d patients whose N..O columns differ from their eyes' keywords (keywords used, as the paper)",
                    path.name, disagree)


def load_odir(config) -> Plan:
    if not config.data_root:
        raise DataError("--preset odir needs --data-root: the folder holding the ODIR annotation files and images")
    root = Path(config.data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder")
    test_sets = list(config.odir_test_sets) or ["on-site"]
    unknown = [name for name in test_sets if name not in ("on-site", "off-site")]
    if unknown:
        raise DataError(f"--odir-test-sets: unknown set(s) {', '.join(unknown)}; choose from on-site, off-site")
    annotations: dict[str, Path] = {}
    for kind, given in (("train", config.train_csv), *((name, config.test_csv if i == 0 else "") for i, name in enumerate(test_sets))):
        path = Path(given) if given else find_odir_annotation(root, kind)
        if path is None:
            expected = {"train": "'training annotation (English).xlsx' or 'ODIR-5K_Training_Annotations(Updated)_V2.xlsx'",
                        "on-site": "'on-site test annotation (English).xlsx'",
                        "off-site": "'off-site test annotation (English).xlsx'"}[kind]
            raise DataError(f"ODIR: no {kind} annotation under {root} (expected {expected}, or a CSV copy)")
        annotations[kind] = path
    images = index_images(root)
    pools = {kind: read_odir_annotation(path, images, kind) for kind, path in annotations.items()}
    if config.val_csv:
        pools["val"] = read_odir_annotation(Path(config.val_csv), images, "val")
        splits = dict(train=("train", None), val=("val", None))
    else:
        splits = _carve(pools, "train", pools["train"].patient_ids, config)
    splits["test"] = (test_sets[0], None)
    extra = []
    for name in test_sets[1:]:
        split_name = name.replace("-", "")  # "offsite": a plain results.json key
        splits[split_name] = (name, None)
        extra.append(split_name)
    return Plan(list(ODIR_CLASS_NAMES), pools, splits, extra_tests=extra, carves_validation=not config.val_csv)


# ----------------------------------------------------------------------------------------------
# Any CSV-described multi-label set
# ----------------------------------------------------------------------------------------------
@dataclass
class CsvLayout:
    image_column: str
    label_column: str | None
    diseases: list[str]
    class_columns: list[str]  # one 0/1 column per disease (empty with a label column)
    patient_column: str | None


def _csv_paths(config) -> dict[str, Path]:
    if not config.train_csv or not config.test_csv:
        raise DataError("--dataset csv needs --train-csv and --test-csv (and optionally --val-csv, --image-root)")
    paths = dict(train=Path(config.train_csv).expanduser())
    if config.val_csv:
        paths["val"] = Path(config.val_csv).expanduser()
    paths["test"] = Path(config.test_csv).expanduser()
    return paths


def _binary_columns(frame: pd.DataFrame, exclude: set[str]) -> list[str]:
    """Header columns whose values are all 0, 1, -1 or blank: the label columns of a one-hot CSV."""
    chosen = []
    for name in frame.columns:
        if name in exclude or name.startswith("Unnamed:"):
            continue
        values = pd.to_numeric(frame[name], errors="coerce")
        given = frame[name].notna()
        if given.any() and values[given].notna().all() and values[given].isin([0, 1, -1]).all():
            chosen.append(name)
    return chosen


def csv_layout(config, train_frame: pd.DataFrame, train_path: Path) -> CsvLayout:
    columns = list(train_frame.columns)
    if not columns:
        raise DataError(f"{train_path} has no columns")
    image_column = config.image_column or columns[0]
    require_columns(train_frame, [image_column], train_path)
    if config.patient_column:
        require_columns(train_frame, [config.patient_column], train_path)
        patient_column = config.patient_column
    else:
        patient_column = next((c for c in PATIENT_COLUMNS if c in columns and c != image_column), None)
    wanted = [c for c in config.classes if not is_no_finding(c)]
    label_column = config.label_column or ("Finding Labels" if "Finding Labels" in columns else None)
    if label_column:
        require_columns(train_frame, [label_column], train_path)
        if wanted:
            diseases = wanted
        else:
            found = {label for value in train_frame[label_column] for label in split_labels(value)}
            diseases = sorted(label for label in found if not is_no_finding(label))
            logger.info("classes from the labels of %s: %s", train_path.name, ", ".join(diseases))
        return CsvLayout(image_column, label_column, diseases, [], patient_column)
    if wanted:
        require_columns(train_frame, wanted, train_path)
        diseases = wanted
    else:
        diseases = [c for c in _binary_columns(train_frame, {image_column, patient_column}) if not is_no_finding(c)]
        if not diseases:
            raise DataError(f"{train_path}: no label columns found (0/1 values); name them with --classes, "
                            f"or give a '|'-separated column with --label-column")
        logger.info("classes from the header of %s: %s", train_path.name, ", ".join(diseases))
    return CsvLayout(image_column, None, diseases, list(diseases), patient_column)


def _class_column_targets(frame: pd.DataFrame, layout: CsvLayout, path: Path, uncertain: str) -> np.ndarray:
    require_columns(frame, layout.class_columns, path)
    values = frame[layout.class_columns].apply(pd.to_numeric, errors="coerce")
    given = frame[layout.class_columns].notna()
    bad = given & ~values.isin([0, 1, -1])
    if bad.to_numpy().any():
        row, column = np.argwhere(bad.to_numpy())[0]
        raise DataError(
            f"{path}: {int(bad.to_numpy().sum())} label values are not 0/1, e.g. {frame.iloc[row, frame.columns.get_loc(layout.class_columns[column])]!r} "
            f"in column {layout.class_columns[column]!r} of row {row + 2}"
        )
    matrix = values.fillna(0).to_numpy(dtype=np.float32, copy=True)  # blank = not mentioned = negative (CheXpert)
    if (matrix == -1).any():
        if uncertain == "error":
            raise DataError(f"{path}: {int((matrix == -1).sum())} labels are -1 (uncertain); choose --uncertain-label zero or one")
        matrix[matrix == -1] = 1.0 if uncertain == "one" else 0.0
    targets = np.zeros((len(frame), len(layout.diseases) + 1), dtype=np.float32)
    targets[:, :-1] = matrix
    targets[:, -1] = matrix.sum(axis=1) == 0
    stated_column = next((c for c in frame.columns if is_no_finding(c)), None)
    if stated_column is not None:
        stated = pd.to_numeric(frame[stated_column], errors="coerce").fillna(0).to_numpy() == 1
        conflicts = int((stated & (matrix.sum(axis=1) > 0)).sum())
        if conflicts:
            logger.warning("%s: %d rows say No Finding and list a disease; No Finding is derived from the diseases", path, conflicts)
    return targets


def _merge_repeated_rows(image_ids, targets, patients, path):
    """Several rows for one image (VinDr-CXR: one per radiologist) -> one row, a disease is
    present if any row says so."""
    first: dict[str, int] = {}
    for row, image_id in enumerate(image_ids):
        first.setdefault(image_id, row)
    if len(first) == len(image_ids):
        return image_ids, targets, patients
    group = np.array([first[image_id] for image_id in image_ids])
    keep = np.array(sorted(first.values()))
    merged = np.zeros((len(image_ids), targets.shape[1]), dtype=np.float32)
    np.maximum.at(merged, group, targets)
    merged = merged[keep]
    merged[:, -1] = merged[:, :-1].sum(axis=1) == 0
    logger.info("%s: %d images have several rows (e.g. one per reader); merged, a disease counts if any row has it",
                path, len(image_ids) - len(first))
    return [image_ids[i] for i in keep], merged, ([patients[i] for i in keep] if patients is not None else None)


def _with_suffix(paths: list[Path]) -> list[Path]:
    """Ids without a file suffix (VinDr-CXR's image_id): take the suffix the first such file has on disk."""
    bare = [p for p in paths if not p.suffix]
    if not bare or bare[0].exists():
        return paths
    for suffix in (".png", ".jpg", ".jpeg", ".dicom", ".dcm"):
        if bare[0].with_name(bare[0].name + suffix).exists():
            logger.info("image ids have no file suffix: using %s", suffix)
            return [p.with_name(p.name + suffix) if not p.suffix else p for p in paths]
    return paths


def load_csv(config) -> Plan:
    if config.uncertain_label not in ("error", "zero", "one"):
        raise DataError(f"--uncertain-label {config.uncertain_label!r}: choose error, zero or one")
    paths = _csv_paths(config)
    frames = {name: read_table(path) for name, path in paths.items()}
    layout = csv_layout(config, frames["train"], paths["train"])
    image_root = Path(config.image_root or config.data_root or paths["train"].parent).expanduser()
    pools = {}
    for name, frame in frames.items():
        path = paths[name]
        require_columns(frame, [layout.image_column] + ([layout.label_column] if layout.label_column else []), path)
        if layout.label_column:
            label_sets = [[NO_FINDING if is_no_finding(label) else label for label in split_labels(v)]
                          for v in frame[layout.label_column]]
            targets = multi_hot(label_sets, layout.diseases, f"{path} ({layout.label_column!r})")
        else:
            targets = _class_column_targets(frame, layout, path, config.uncertain_label)
        image_ids = [str(v).strip() for v in frame[layout.image_column]]
        patients = None
        if layout.patient_column and layout.patient_column in frame.columns:
            patients = [str(v).strip() for v in frame[layout.patient_column]]
        image_ids, targets, patients = _merge_repeated_rows(image_ids, targets, patients, path)
        pools[name] = FileImageDataset(
            name=f"csv-{name}-{_origin_tag(path, image_root)}", source=str(path),
            image_paths=_with_suffix([Path(v) if Path(v).is_absolute() else image_root / v for v in image_ids]),
            image_ids=image_ids, targets=targets, class_names=layout.diseases + [NO_FINDING],
            channels=1, patient_ids=patients,
        )
    if config.boxes:
        boxes = read_box_file(Path(config.boxes).expanduser(), layout.diseases + [NO_FINDING])
        attached = sum(_attach_boxes(pool, boxes) for pool in pools.values())
        logger.info("%d boxes attached from %s", attached, config.boxes)
    if "val" in pools:
        splits = dict(train=("train", None), val=("val", None))
    else:
        train = pools["train"]
        groups = train.patient_ids if train.patient_ids is not None else train.image_ids
        if train.patient_ids is None:
            logger.warning("%s has no patient column: the validation split is drawn per image", paths["train"])
        splits = _carve(pools, "train", groups, config)
    splits["test"] = ("test", None)
    return Plan(layout.diseases + [NO_FINDING], pools, splits, carves_validation="val" not in pools)


def _probe_channels(pool: FileImageDataset) -> int:
    """Colour only if the first image really is colour (many X-ray JPEGs are grey stored as RGB)."""
    try:
        image = read_image(pool.image_paths[0], 3)
    except UnreadableImage:
        return 1  # the decode check reports it, together with any other offenders
    spread = np.abs(image.astype(np.int16) - image.mean(axis=2, keepdims=True).astype(np.int16)).max()
    return 3 if spread > 8 else 1


# ----------------------------------------------------------------------------------------------
# Entry points (datasets.py delegates here for every dataset but "synthetic")
# ----------------------------------------------------------------------------------------------
READERS = dict(nih=load_nih, odir=load_odir, csv=load_csv)


def _reader(config):
    if config.dataset not in READERS:
        raise DataError(f"unknown --dataset {config.dataset!r}; choose synthetic, {', '.join(READERS)}")
    return READERS[config.dataset]


def class_names_for(config) -> list[str]:
    """The class list a config implies (reads at most the training CSV's labels)."""
    if config.dataset == "nih":
        return list(NIH_CLASS_NAMES)
    if config.dataset == "odir":
        return list(ODIR_CLASS_NAMES)
    _reader(config)
    paths = _csv_paths(config)
    layout = csv_layout(config, read_table(paths["train"]), paths["train"])
    return layout.diseases + [NO_FINDING]


def build_datasets(config) -> DataSplits:
    """Parse the source, run the pre-flight checks, and return the splits (cached if --cache)."""
    reader = _reader(config)
    preflight.check_config(config, carves_validation=False)
    plan = reader(config)
    preflight.check_config(config, carves_validation=plan.carves_validation)

    def members(split: str) -> tuple[FileImageDataset, np.ndarray]:
        pool_name, indices = plan.splits[split]
        pool = plan.pools[pool_name]
        return pool, (np.arange(len(pool)) if indices is None else indices)

    layout = {}
    for split in plan.splits:
        pool, indices = members(split)
        patients = [pool.patient_ids[i] for i in indices] if pool.patient_ids is not None else None
        layout[split] = ([pool.image_paths[i] for i in indices], patients)
    preflight.check_splits(layout, {split: plan.pools[plan.splits[split][0]].source for split in plan.splits})

    stats = {name: preflight.stat_images(pool.image_paths, pool.source) for name, pool in plan.pools.items()}
    channels = _probe_channels(plan.pools["train"]) if config.dataset == "csv" else None
    for pool in plan.pools.values():
        pool.channels = channels or pool.channels
        pool.fit_boxes_to_images()
    threads = preflight.thread_count(config)
    ready: dict[str, MultiLabelDataset] = {}
    for name, pool in plan.pools.items():
        if config.cache:
            ready[name] = image_cache.cached_dataset(pool, config, pool.name, stats[name])
        else:
            if config.verify_images:
                preflight.check_decodable(pool, pool.source, threads)
            ready[name] = pool

    def view(split: str) -> MultiLabelDataset:
        pool_name, indices = plan.splits[split]
        return ready[pool_name] if indices is None else SubsetDataset(ready[pool_name], indices, split)

    splits = DataSplits(
        train=view("train"), val=view("val"), test=view("test"), class_names=list(plan.class_names),
        extra_tests={name: view(name) for name in plan.extra_tests} or None,
    )
    logger.info("%s: %d train / %d val / %d test images%s", config.dataset, len(splits.train), len(splits.val), len(splits.test),
                "".join(f" / {len(d)} {n}" for n, d in (splits.extra_tests or {}).items()))
    return splits


def dataset_scores(config, split_name: str, disease_targets: np.ndarray, probabilities: np.ndarray) -> dict:
    """Metrics a dataset reports besides per-class AUC: the official ODIR score for ODIR, else none.

    disease_targets, probabilities: [N, C] (No Finding excluded), as ``Trainer.predict`` returns.
    """
    if config.dataset == "odir" and len(disease_targets):
        return dict(odir_score=odir_score(np.asarray(disease_targets), np.asarray(probabilities)))
    return {}
