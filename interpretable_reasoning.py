"""Why the model says what it says about one image (METHOD.md "Interpretable reasoning").

    python interpretable_reasoning.py --checkpoint RUN/checkpoints/best_pushed.pt --image xray.png
    python interpretable_reasoning.py --checkpoint CKPT --image synthetic-test-00012 --classes Effusion,Cardiomegaly
    python interpretable_reasoning.py --checkpoint CKPT --image 00012345_000.png --boxes BBox_List_2017.csv
    python interpretable_reasoning.py --checkpoint CKPT --images FOLDER_or_LIST.csv     # predictions.csv only

For every class shown, the figure has one row per prototype of that class (highest similarity
first, --rows of them; the others are summed in one line): the test image with that prototype's
similarity map (0.7 image + 0.3 jet, white 0.65 contour, yellow high-activation box; ground-truth
boxes magenta) | the prototype's training patch | max similarity x last-layer weight = contribution.
The contributions sum to the class logit l_c the model computes, and P(c) = sigma(l_c - l_NF).
A prototype that matched test images with and without its class alike when the checkpoint was
tested (main.py's final test, push.py) is titled "matches all" in red: it adds about the same to
every image and explains nothing. reasoning.json holds the same numbers. The output folder (default
reasoning-<image name>) is written all at once, after every input has been checked and every number
computed.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.images import IMAGE_SUFFIXES, read_image
from data.tables import read_box_file
from datasets import DataError, EvalTransform, build_datasets
from model import disease_probabilities, squared_distances
from utils.checkpoint import CheckpointError, atomic_write_json, atomic_write_text
from utils.cli import run_script
from utils.localisation import high_activation_boxes
from utils.visualise import (
    ReasoningBlock, ReasoningRow, check_output_dir, load_model_from_checkpoint, prototype_views,
    reasoning_figure, similarity_images, staged_output,
)

logger = logging.getLogger("cipl.reasoning")

MARKERS = ("reasoning.json", "predictions.csv")
PATH_COLUMNS = ("path", "image", "image index", "image_id", "file")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Render CIPL's reasoning for one image (per class: which prototypes it resembles, how\n"
                    "much each adds to the class logit, and P(class) = sigmoid(l_c - l_NF)), and/or write\n"
                    "predictions.csv for a folder of images.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="a pushed CIPL checkpoint (see push.py)")
    parser.add_argument("--image", default="", help="an image file, or the id of an image of the checkpoint's "
                        "dataset (e.g. synthetic-test-00012), whose labels and boxes are then shown")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--classes", default="", help="comma-separated class names to explain, in this order")
    shown.add_argument("--top-k", type=int, default=3, help="explain the K diseases of highest probability (default 3)")
    parser.add_argument("--rows", type=int, default=5,
                        help="prototype rows per class in the figure, the rest summed in one line (default 5)")
    parser.add_argument("--boxes", default="", help="ground-truth boxes, CSV in the NIH BBox_List_2017.csv layout "
                        "(Image Index, Finding Label, x, y, w, h in image-file pixels)")
    parser.add_argument("--images", default="", help="a folder of images, or a CSV listing image paths: write "
                        "predictions.csv (one row per image, one probability column per disease)")
    parser.add_argument("--out", default="", help="output folder (default reasoning-<image name>, or "
                        "predictions-<folder name> with --images only)")
    parser.add_argument("--data-root", default="", help="dataset folder, if it moved since training")
    parser.add_argument("--device", default="", help="auto, cpu, cuda or cuda:N (default: the run's setting)")
    parser.add_argument("--batch-size", type=int, default=0, help="images per batch for --images (default: the run's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


# ----------------------------------------------------------------------------------------------
# The numbers
# ----------------------------------------------------------------------------------------------
@dataclass
class Explanation:
    """One image through the model. Contributions [K, P] = W * s sum over P to the model's logits."""

    logits: np.ndarray  # [K] the model's own, float32 as computed
    scores: np.ndarray  # [P] max similarity exp(-min d / D), as the last layer received them
    weights: np.ndarray  # [K, P] last-layer weights
    contributions: np.ndarray  # [K, P] float64
    probabilities: np.ndarray  # [C] sigmoid(l_c - l_NF)
    similarity_maps: torch.Tensor  # [P, h, w] float64, for drawing
    peak_locations: np.ndarray  # [P, 2] (row, col) of each prototype's nearest patch


@torch.no_grad()
def explain(model, image: torch.Tensor) -> Explanation:
    """image [3, S, S] (EvalTransform output) -> the model's logit decomposition for it."""
    output = model(image.unsqueeze(0).to(model.prototypes.device))
    # The same expression classify_features feeds to the last layer, so the decomposition is exact.
    scores = torch.exp(-output.min_distances / model.prototype_dim)[0]
    weights = model.last_layer.weight
    contributions = weights.double() * scores.double().unsqueeze(0)
    # Display maps in float64: near-equal distances must not collapse to one similarity value.
    distances = squared_distances(output.features.double(), model.prototypes.double())[0]
    peaks = distances.flatten(1).argmin(dim=1)
    width = distances.shape[-1]
    return Explanation(
        logits=output.logits[0].cpu().numpy(),
        scores=scores.cpu().numpy(),
        weights=weights.detach().cpu().numpy(),
        contributions=contributions.cpu().numpy(),
        probabilities=disease_probabilities(output.logits)[0].cpu().numpy(),
        similarity_maps=torch.exp(-distances / model.prototype_dim).cpu(),
        peak_locations=torch.stack([peaks // width, peaks % width], dim=1).cpu().numpy(),
    )


def choose_classes(model, explanation: Explanation, names: str, top_k: int) -> list[int]:
    if names:
        lookup = {name.lower(): index for index, name in enumerate(model.class_names)}
        chosen = []
        for name in (part.strip() for part in names.split(",")):
            if not name:
                continue
            if name.lower() not in lookup:
                raise ValueError(f"unknown class {name!r}; the model's classes are: {', '.join(model.class_names)}")
            chosen.append(lookup[name.lower()])
        if not chosen:
            raise ValueError("--classes names no class")
        return list(dict.fromkeys(chosen))
    if top_k < 1:
        raise ValueError("--top-k must be at least 1")
    return [int(c) for c in np.argsort(-explanation.probabilities, kind="stable")[:top_k]]


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
@dataclass
class TestImage:
    name: str
    image: np.ndarray
    labels: np.ndarray | None  # [K] when the image comes from the dataset
    boxes: list  # [(class_index, x, y, w, h)] in image pixels


def find_dataset_image(splits, image_id: str) -> TestImage | None:
    for split in (splits.test, splits.val, splits.train, *((splits.extra_tests or {}).values())):
        if image_id in split.image_ids:
            index = split.image_ids.index(image_id)
            return TestImage(image_id, split.load_image(index), split.targets[index], list(split.boxes.get(index, [])))
    return None


def list_images(spec: str) -> list[Path]:
    """--images: a folder (its image files, sorted) or a CSV with a path column (relative to the CSV)."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"--images {path}: the folder holds no {'/'.join(sorted(s[1:] for s in IMAGE_SUFFIXES))} images")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"--images {path}: no such folder or CSV file")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"--images {path}: not a readable CSV file ({type(error).__name__})") from error
    columns = {str(column).strip().lower(): column for column in frame.columns}
    column = next((columns[name] for name in PATH_COLUMNS if name in columns), frame.columns[0])
    files = [p if p.is_absolute() else path.parent / p for p in map(Path, frame[column].astype(str))]
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--images {path}: {len(missing)} listed images do not exist, e.g. {missing[0]}")
    if not files:
        raise DataError(f"--images {path}: lists no images")
    return files


def image_channels(config, dataset=None) -> int:
    """How the run read its images: grey (1) or RGB (3); read new files the same way."""
    return getattr(dataset, "channels", None) or (3 if config.dataset == "odir" else 1)


class _ImageFiles(Dataset):
    def __init__(self, paths: list[Path], transform, channels: int):
        self.paths, self.transform, self.channels = paths, transform, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(read_image(self.paths[index], self.channels))


@torch.no_grad()
def predict_files(model, paths: list[Path], image_size: int, batch_size: int, channels: int = 1,
                  progress: bool = True) -> np.ndarray:
    """Disease probabilities [N, C] for image files, in batches."""
    loader = DataLoader(_ImageFiles(paths, EvalTransform(image_size), channels), batch_size=batch_size, shuffle=False)
    device = model.prototypes.device
    rows = [disease_probabilities(model(batch.to(device)).logits).cpu().numpy()
            for batch in tqdm(loader, desc="predict", leave=False, disable=not progress)]
    return np.concatenate(rows)


# ----------------------------------------------------------------------------------------------
# Figure data
# ----------------------------------------------------------------------------------------------
def reasoning_blocks(model, explanation: Explanation, test: TestImage, classes: list[int], rows: int, train,
                     image_size: int, unselective: Collection[int] | None = None) -> tuple[list[ReasoningBlock], dict]:
    """Figure blocks and the reasoning.json record of the chosen classes. ``unselective``: the prototypes
    the checkpoint records as matching test images with and without their class alike (None: no record)."""
    flagged = set(unselective or ())
    prototype_class = model.prototype_class.cpu().numpy()
    nf = model.no_finding_index
    own = {c: sorted(np.flatnonzero(prototype_class == c).tolist(), key=lambda j: -explanation.scores[j]) for c in classes}
    shown = {c: own[c][:rows] for c in classes}
    drawn = [j for c in classes for j in shown[c]]
    views = {view.prototype: view for view in prototype_views(model, train, image_size, prototypes=drawn)} if drawn else {}
    height, width = test.image.shape[:2]
    grid = model.cell_grid(image_size)
    maps = similarity_images(explanation.similarity_maps[drawn], [(height, width)] * len(drawn), grid) if drawn else []
    boxes = high_activation_boxes(np.stack(maps)) if drawn else np.zeros((0, 4))
    drawn_slot = {j: slot for slot, j in enumerate(drawn)}
    truth = {}
    for class_index, x, y, w, h in test.boxes:
        truth.setdefault(int(class_index), []).append((x, y, w, h))

    blocks, records = [], []
    for c in classes:
        contributions = explanation.contributions[c]
        logit = float(explanation.logits[c])
        others = np.flatnonzero(prototype_class != c)
        hidden = own[c][rows:]
        probability = None if c == nf else float(explanation.probabilities[c])
        blocks.append(ReasoningBlock(
            class_name=model.class_names[c],
            logit=logit,
            reference_logit=float(explanation.logits[nf]),
            probability=probability,
            rows=[ReasoningRow(
                prototype=j,
                similarity=float(explanation.scores[j]),
                weight=float(explanation.weights[c, j]),
                contribution=float(contributions[j]),
                test_map=maps[drawn_slot[j]],
                test_box=tuple(boxes[drawn_slot[j]]),
                patch=views[j].patch,
                source_id=views[j].image_id,
                unselective=j in flagged,
            ) for j in shown[c]],
            hidden_count=len(hidden),
            hidden_contribution=float(contributions[hidden].sum()),
            other_classes_contribution=float(contributions[others].sum()),
            truth_boxes=truth.get(c, []),
            positive=None if test.labels is None else bool(test.labels[c] > 0),
        ))
        records.append(dict(
            class_name=model.class_names[c],
            logit=logit,
            no_finding_logit=float(explanation.logits[nf]),
            probability=probability,
            sum_of_contributions=float(contributions.sum()),
            other_classes_contribution=float(contributions[others].sum()),
            ground_truth=None if test.labels is None else bool(test.labels[c] > 0),
            ground_truth_boxes=[list(map(float, box)) for box in truth.get(c, [])],
            prototypes=[dict(
                prototype=j,
                shown=j in shown[c],
                similarity=float(explanation.scores[j]),
                weight=float(explanation.weights[c, j]),
                contribution=float(contributions[j]),
                test_location=explanation.peak_locations[j].tolist(),
                test_box=[float(v) for v in boxes[drawn_slot[j]]] if j in shown[c] else None,
                source_image_id=views[j].image_id if j in views else None,
                source_location=model.prototype_source_location[j].tolist(),
                unselective=None if unselective is None else j in flagged,
            ) for j in own[c]],
        ))
    return blocks, dict(classes=records)


# ----------------------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------------------
def default_out(args) -> Path:
    if args.image:
        return Path(f"reasoning-{Path(args.image).stem}")
    return Path(f"predictions-{Path(args.images).stem or 'images'}")


def run(args: argparse.Namespace) -> Path:
    progress = not args.no_progress
    if not args.image and not args.images:
        raise ValueError("give --image (a reasoning figure) and/or --images (predictions.csv)")
    if args.rows < 1:
        raise ValueError("--rows must be at least 1")
    if args.batch_size < 0:
        raise ValueError("--batch-size must be positive")
    state, config, model = load_model_from_checkpoint(args.checkpoint, device=args.device, data_root=args.data_root)
    out = Path(args.out) if args.out else default_out(args)
    check_output_dir(out, MARKERS)
    if args.classes:  # fail on a wrong name before any work
        choose_classes(model, None, args.classes, args.top_k)
    box_file = read_box_file(Path(args.boxes), model.class_names) if args.boxes else None
    files = list_images(args.images) if args.images else []

    record = figure_args = None
    if args.image:
        if not model.is_pushed:
            raise CheckpointError(f"{state['path']} holds prototypes that were never pushed onto training patches: "
                                  f"run push.py on it first and use the *_pushed.pt it writes")
        image_path = Path(args.image)
        if not image_path.is_file() and image_path.suffix.lower() in IMAGE_SUFFIXES:
            raise FileNotFoundError(f"image {image_path}: no such file")
        splits = build_datasets(config)
        if image_path.is_file():
            test = TestImage(image_path.name, read_image(image_path, image_channels(config, splits.train)), None, [])
        else:
            test = find_dataset_image(splits, args.image)
            if test is None:
                raise FileNotFoundError(f"image {args.image}: no such file, nor an image id of the checkpoint's dataset")
        if box_file is not None:
            by_name = {Path(name).name: boxes for name, boxes in box_file.items()}
            test.boxes = box_file.get(test.name) or by_name.get(Path(test.name).name, [])
            if not test.boxes:
                logger.warning("boxes file %s has no boxes for %s", args.boxes, test.name)
        explanation = explain(model, EvalTransform(config.image_size)(test.image))
        classes = choose_classes(model, explanation, args.classes, args.top_k)
        blocks, record = reasoning_blocks(model, explanation, test, classes, args.rows, splits.train, config.image_size,
                                          state.get("unselective_prototypes"))
        disease_names = model.class_names[:-1]
        record = dict(
            image=args.image,
            checkpoint=str(Path(state["path"]).resolve()),
            image_shape=list(test.image.shape[:2]),
            model_input_size=config.image_size,
            probabilities=dict(zip(disease_names, map(float, explanation.probabilities))),
            logits=dict(zip(model.class_names, map(float, explanation.logits))),
            ground_truth_labels=None if test.labels is None else
            [name for name, value in zip(model.class_names, test.labels) if value > 0],
            **record,
        )
        truth_by_name: dict[str, list] = {}
        for class_index, x, y, w, h in test.boxes:
            truth_by_name.setdefault(model.class_names[int(class_index)], []).append((x, y, w, h))
        figure_args = dict(image=test.image, title=f"CIPL reasoning for {test.name}", blocks=blocks,
                           probabilities=record["probabilities"], truth_boxes=truth_by_name)
    predictions = None
    if files:
        predictions = predict_files(model, files, config.image_size, args.batch_size or config.eval_batch_size,
                                    image_channels(config), progress)

    with staged_output(out, MARKERS) as staging:
        if figure_args is not None:
            reasoning_figure(path=staging / "reasoning.png", **figure_args)
            atomic_write_json(staging / "reasoning.json", record)
        if predictions is not None:
            atomic_write_text(staging / "predictions.csv", predictions_csv(files, args.images, model.class_names[:-1], predictions))
    logger.info("wrote %s", out)
    return out


def predictions_csv(files: list[Path], spec: str, disease_names: list[str], probabilities: np.ndarray) -> str:
    base = Path(spec) if Path(spec).is_dir() else Path(spec).parent
    names = [str(p.relative_to(base)) if p.is_relative_to(base) else str(p) for p in files]
    frame = pd.DataFrame(probabilities, columns=disease_names)
    frame.insert(0, "image", names)
    return frame.to_csv(index=False, float_format="%.6f")


def main(argv: list[str] | None = None) -> int:
    return run_script("interpretable_reasoning.py", get_args_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
