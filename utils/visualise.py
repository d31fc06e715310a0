"""Pictures of the prototypes and of the model's reasoning (METHOD.md "Push", "Interpretable reasoning").

Building blocks follow METHOD.md: a similarity map is upsampled to the image, min-max normalised and
overlaid as 0.7 image + 0.3 jet; its 0.65 contour is drawn in white and its high-activation box (95th
percentile, the connected component holding the maximum) in yellow; ground-truth boxes are magenta.
Figures are drawn on matplotlib ``Figure`` objects with the Agg canvas, never through pyplot, so
nothing here needs a display or touches global plotting state.

Also here, because both interpretation scripts need them: loading a checkpoint for inference
(:func:`load_model_from_checkpoint`) and writing a result folder all at once (:func:`staged_output`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator, Sequence

import cv2
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from datasets import class_names_for
from model import CIPL, CellGrid, paired_similarity_maps
from settings import Config
from utils.checkpoint import CheckpointError, check_compatible, load_checkpoint, load_model_weights
from utils.localisation import high_activation_boxes, normalise_maps, upsample_maps
from utils.prototype_quality import image_features
from utils.training import resolve_device

logger = logging.getLogger(__name__)

IMAGE_WEIGHT = 0.7  # overlay = 0.7 image + 0.3 jet
CONTOUR_LEVEL = 0.65
BOX_PERCENTILE = 95.0
CONTOUR_COLOUR = (255, 255, 255)
BOX_COLOUR = (255, 255, 0)
TRUTH_COLOUR = (255, 0, 255)
LEGEND = "white: 0.65 similarity contour   yellow: high-activation box   magenta: ground truth"


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def load_model_from_checkpoint(path, device: str = "cpu", data_root: str = ""):
    """(state, config, model) for inference: the model in eval mode on ``device``.

    Raises CheckpointError with a one-line reason for anything that is not a complete CIPL
    checkpoint. The backbone is built without ImageNet weights (the checkpoint replaces them), so
    this works offline whatever the run's ``pretrained`` setting.
    """
    state = load_checkpoint(path)
    for key in ("config", "model"):
        if key not in state:
            raise CheckpointError(f"{state['path']} is not a complete CIPL checkpoint (it has no {key!r})")
    try:
        config = Config.from_dict(state["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{state['path']}: its configuration cannot be read ({error})") from error
    if data_root:
        config.data_root = data_root
    if device:
        config.device = device
    class_names = state.get("class_names")
    if not class_names:
        class_names = class_names_for(config)
    model = CIPL(class_names, backbone=config.backbone, prototype_dim=config.prototype_dim,
                 prototypes_per_class=config.prototypes_per_class)
    if "model_description" in state:
        check_compatible(state, model)
    load_model_weights(model, state)
    model.to(resolve_device(config.device)).eval()
    return state, config, model


# ----------------------------------------------------------------------------------------------
# Output folders
# ----------------------------------------------------------------------------------------------
def _markers(marker: str | Sequence[str]) -> tuple[str, ...]:
    return (marker,) if isinstance(marker, str) else tuple(marker)


def check_output_dir(out: Path, marker: str | Sequence[str]) -> None:
    """Refuse an --out that is a file, or a non-empty folder that is not an earlier output of the same
    tool (recognised by one of its ``marker`` files): replacing it would destroy someone's files."""
    out = Path(out)
    markers = _markers(marker)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not any((out / name).exists() for name in markers):
        raise ValueError(f"--out {out} is a non-empty folder that holds no {' or '.join(markers)} of an earlier run: "
                         f"choose a new or empty folder")


@contextlib.contextmanager
def staged_output(out: Path, marker: str | Sequence[str]) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; on success it replaces ``out`` in one rename,
    on failure it is removed. A reader therefore sees the old result or the new one, never half."""
    out = Path(out)
    markers = _markers(marker)
    check_output_dir(out, markers)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
        if not any((staging / name).exists() for name in markers):
            raise RuntimeError(f"internal error: none of {', '.join(markers)} was written")
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, retired / out.name)
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# Image building blocks (uint8 RGB in, uint8 RGB out)
# ----------------------------------------------------------------------------------------------
def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] -> uint8 [H, W, 3]."""
    image = np.asarray(image)
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    return image[..., :3].copy()


def jet(normalised_map: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> float [H, W, 3] RGB in [0, 1] (OpenCV's jet: blue low, red high)."""
    grey = np.uint8(np.clip(normalised_map, 0, 1) * 255)
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB).astype(np.float32) / 255


def overlay(image: np.ndarray, normalised_map: np.ndarray, image_weight: float = IMAGE_WEIGHT) -> np.ndarray:
    """image_weight x image + (1 - image_weight) x jet(map), uint8 RGB."""
    rgb = to_rgb(image).astype(np.float32) / 255
    mixed = image_weight * rgb + (1 - image_weight) * jet(normalised_map)
    return np.uint8(np.clip(mixed * 255 + 0.5, 0, 255))


def line_width(image: np.ndarray) -> int:
    return max(1, round(max(image.shape[:2]) / 200))


def draw_contour(rgb: np.ndarray, normalised_map: np.ndarray, level: float = CONTOUR_LEVEL,
                 colour=CONTOUR_COLOUR) -> np.ndarray:
    mask = np.uint8(normalised_map >= level)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return cv2.drawContours(np.ascontiguousarray(rgb).copy(), contours, -1, colour, line_width(rgb))


def draw_box(rgb: np.ndarray, box, colour=BOX_COLOUR) -> np.ndarray:
    """Box (x, y, w, h) in pixels, pixel i covering [i, i + 1): the outline runs on its border pixels."""
    x, y, w, h = (float(v) for v in box)
    top_left = (int(round(x)), int(round(y)))
    bottom_right = (max(top_left[0], int(round(x + w)) - 1), max(top_left[1], int(round(y + h)) - 1))
    return cv2.rectangle(np.ascontiguousarray(rgb).copy(), top_left, bottom_right, colour, line_width(rgb))


def crop(image: np.ndarray, box) -> np.ndarray:
    x, y, w, h = (int(round(float(v))) for v in box)
    return np.ascontiguousarray(image[max(0, y) : max(0, y) + max(1, h), max(0, x) : max(0, x) + max(1, w)])


def square_pad(image: np.ndarray, fill: int = 255) -> np.ndarray:
    """Pad to a square with ``fill`` around the centre, so patches of any shape tile a grid evenly."""
    height, width = image.shape[:2]
    side = max(height, width)
    padded = np.full((side, side) + image.shape[2:], fill, dtype=image.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    padded[top : top + height, left : left + width] = image
    return padded


def annotate(image: np.ndarray, normalised_map: np.ndarray, box=None, truth_boxes: Sequence = ()) -> np.ndarray:
    """The METHOD.md picture: overlay, 0.65 contour, high-activation box, and ground-truth boxes."""
    picture = draw_contour(overlay(image, normalised_map), normalised_map)
    if box is not None:
        picture = draw_box(picture, box, BOX_COLOUR)
    for truth in truth_boxes:
        picture = draw_box(picture, truth, TRUTH_COLOUR)
    return picture


def save_png(path: Path, image: np.ndarray) -> None:
    """uint8 grey or RGB -> PNG."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def similarity_images(similarity: torch.Tensor, sizes: Sequence[tuple[int, int]], grid: CellGrid) -> list[np.ndarray]:
    """Similarity maps [N, h, w] -> each upsampled to its image's (H, W), with the cells where ``grid``
    (the model's :meth:`~model.CIPL.cell_grid`) puts them, and min-max normalised; maps that share a
    size are upsampled together."""
    result: list[np.ndarray | None] = [None] * len(sizes)
    for size in sorted(set(map(tuple, sizes))):
        members = [i for i, s in enumerate(sizes) if tuple(s) == size]
        upsampled = upsample_maps(similarity[members], size, grid).cpu().numpy()
        normalised, _ = normalise_maps(upsampled)
        for slot, member in enumerate(members):
            result[member] = normalised[slot].astype(np.float32)
    return result


# ----------------------------------------------------------------------------------------------
# Prototypes on their source images
# ----------------------------------------------------------------------------------------------
@dataclass
class PrototypeView:
    """A pushed prototype on its source training image, ready to draw."""

    prototype: int
    class_index: int
    class_name: str
    image_index: int
    image_id: str
    location: tuple[int, int]  # (row, col) on the feature map
    distance: float  # squared distance recorded at push
    similarity: float  # exp(-distance / D)
    image: np.ndarray  # the source image, as load_image returns it
    map: np.ndarray  # normalised similarity map at the image's resolution
    box: tuple[float, float, float, float]  # high-activation box (x, y, w, h), image pixels
    # The source image's ground-truth boxes of the prototype's own class (x, y, w, h), image pixels;
    # empty where the training split has none. Drawn in magenta: a grounded prototype's yellow box
    # lies mostly inside one of them.
    truth_boxes: tuple[tuple[float, float, float, float], ...] = ()

    @property
    def patch(self) -> np.ndarray:
        return crop(self.image, self.box)

    @property
    def picture(self) -> np.ndarray:
        return annotate(self.image, self.map, self.box, self.truth_boxes)


@dataclass
class GalleryEntry:
    """What a gallery cell shows, with pictures shrunk so a class of 50 prototypes fits in memory."""

    prototype: int
    class_index: int
    image_id: str
    location: tuple[int, int]
    distance: float
    similarity: float
    picture: np.ndarray
    patch: np.ndarray
    truth_boxes: tuple = ()  # as PrototypeView.truth_boxes (already drawn into the picture)

    @classmethod
    def of(cls, view: PrototypeView, max_side: int = 320) -> "GalleryEntry":
        return cls(view.prototype, view.class_index, view.image_id, view.location, view.distance, view.similarity,
                   shrink(view.picture, max_side), shrink(view.patch, max_side), view.truth_boxes)


def shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale (area interpolation) so the longer side is at most ``max_side``; never upscale."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def prototype_views(model, dataset, image_size: int, prototypes: Sequence[int] | None = None,
                    batch_size: int = 16) -> list[PrototypeView]:
    """All views of :func:`iter_prototype_views` as a list (for a few prototypes)."""
    return list(iter_prototype_views(model, dataset, image_size, prototypes, batch_size))


@torch.no_grad()
def iter_prototype_views(model, dataset, image_size: int, prototypes: Sequence[int] | None = None,
                         batch_size: int = 16) -> Iterator[PrototypeView]:
    """Views of the given (default: all pushed) prototypes on their source images, in prototype order,
    produced a batch at a time (a view holds a full-resolution image and map).

    The source images are read and run through the network once each, in batches; the distance map of
    every prototype to its own image is taken for all prototypes of a batch at once.
    """
    source = model.prototype_source_index.cpu().numpy()
    if prototypes is None:
        prototypes = np.flatnonzero(source >= 0).tolist()
    unpushed = [j for j in prototypes if source[j] < 0]
    if unpushed:
        raise ValueError(f"prototype {unpushed[0]} has not been pushed onto a training image")
    device = model.prototypes.device
    location = model.prototype_source_location.cpu().numpy()
    distance = model.prototype_source_distance.cpu().numpy()
    boxes_of = getattr(dataset, "boxes", None) or {}
    dim = model.prototype_dim
    grid = model.cell_grid(image_size)
    order = list(prototypes)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        unique, inverse = np.unique(source[chosen], return_inverse=True)
        features, raw = image_features(model, dataset, unique, image_size, device)
        similarity = paired_similarity_maps(features[torch.as_tensor(inverse, device=device)],
                                            model.prototypes[torch.as_tensor(chosen, device=device)], dim)
        maps = similarity_images(similarity, [raw[i].shape[:2] for i in inverse], grid)
        boxes = high_activation_boxes(np.stack(maps)) if len({m.shape for m in maps}) == 1 else np.concatenate(
            [high_activation_boxes(m[None]) for m in maps]
        )
        for slot, prototype in enumerate(chosen):
            image_index = int(source[prototype])
            class_index = int(model.prototype_class[prototype])
            yield PrototypeView(
                prototype=int(prototype),
                class_index=class_index,
                class_name=model.class_names[class_index],
                image_index=image_index,
                image_id=str(dataset.image_ids[image_index]),
                location=(int(location[prototype, 0]), int(location[prototype, 1])),
                distance=float(distance[prototype]),
                similarity=float(np.exp(-distance[prototype] / dim)),
                image=raw[inverse[slot]],
                map=maps[slot],
                box=tuple(float(v) for v in boxes[slot]),
                truth_boxes=tuple(tuple(float(v) for v in truth[1:]) for truth in boxes_of.get(image_index, ())
                                  if int(truth[0]) == class_index),
            )


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _show(axis, image: np.ndarray, title: str = "", fontsize: float = 9) -> None:
    axis.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest"
                if max(image.shape[:2]) < 64 else "antialiased")
    axis.set_xticks([])
    axis.set_yticks([])
    if title:
        axis.set_title(title, fontsize=fontsize)


UNSELECTIVE_TITLE_COLOUR = "#c00000"


def _title_unselective(axis, prototype: int, fontsize: float) -> None:
    """The title of a prototype that matches images with and without its class alike (gallery, reasoning)."""
    axis.set_title(f"prototype {prototype}: matches all", fontsize=fontsize, fontweight="bold", color=UNSELECTIVE_TITLE_COLOUR)


def gallery_figure(class_name: str, views: Sequence[PrototypeView | GalleryEntry], path: Path, columns: int = 4,
                   unselective: Collection[int] = ()) -> Figure:
    """One class's prototypes: per prototype its annotated source image and its patch, captioned with
    the prototype index, the source image id, the feature-map location and the similarity at push.
    Prototypes in ``unselective`` (they match images with and without their class alike; see
    utils.prototype_quality) are titled "matches all" in red, so that no one reads them as evidence. Returns the
    figure it saved."""
    count = max(1, len(views))
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    width = max(4.2 * columns, 10.0)
    figure = _new_figure(width, 2.8 * rows + 1.0)
    figure.suptitle(f"{class_name}: {len(views)} prototypes", fontsize=15, fontweight="bold", y=1 - 0.25 / (2.8 * rows + 1.0))
    truth = "; magenta: ground-truth box of the class" if any(view.truth_boxes for view in views) else ""
    figure.text(0.5, 1 - 0.7 / (2.8 * rows + 1.0), "each prototype: source training image (0.7 image + 0.3 jet similarity; "
                f"white: 0.65 contour; yellow: high-activation box{truth}) | its patch", ha="center", fontsize=10)
    side = 4.2 * columns / width
    grid = figure.add_gridspec(rows, 2 * columns, left=0.02, right=0.02 + 0.96 * side, bottom=0.03,
                               top=1 - 1.0 / (2.8 * rows + 1.0), wspace=0.08, hspace=0.45)
    for slot, view in enumerate(views):
        row, column = divmod(slot, columns)
        source_axis = figure.add_subplot(grid[row, 2 * column])
        patch_axis = figure.add_subplot(grid[row, 2 * column + 1])
        _show(source_axis, view.picture)
        _show(patch_axis, square_pad(view.patch))
        if view.prototype in unselective:
            _title_unselective(source_axis, view.prototype, fontsize=10)
        else:
            source_axis.set_title(f"prototype {view.prototype}", fontsize=10, fontweight="bold")
        patch_axis.set_title(f"similarity at push {view.similarity:.3f}", fontsize=9)
        source_axis.set_xlabel(f"{view.image_id} @ {view.location}", fontsize=8)
        patch_axis.set_xlabel(f"d = {view.distance:.3g}", fontsize=8)
    if not views:
        axis = figure.add_subplot(grid[0, 0])
        axis.axis("off")
        axis.text(0, 0.5, "no pushed prototypes", fontsize=12)
    figure.savefig(path)
    return figure


@dataclass
class ReasoningRow:
    """One prototype's part in one class's logit."""

    prototype: int
    similarity: float  # max over the test image of exp(-d / D)
    weight: float  # last-layer weight W[c, j]
    contribution: float  # similarity x weight
    test_map: np.ndarray  # normalised similarity map on the test image
    test_box: tuple  # its high-activation box on the test image
    patch: np.ndarray  # the prototype's training patch
    source_id: str
    unselective: bool = False  # matched test images with and without its class alike (prototype_quality)


@dataclass
class ReasoningBlock:
    """One class of the reasoning figure."""

    class_name: str
    logit: float  # the model's own logit l_c
    reference_logit: float  # l_NF
    probability: float | None  # sigmoid(l_c - l_NF); None for No Finding itself
    rows: list[ReasoningRow]  # the rows shown, highest similarity first
    hidden_count: int  # prototypes of this class not shown
    hidden_contribution: float
    other_classes_contribution: float  # prototypes of other classes (0 when the last layer is class-pure)
    truth_boxes: list  # ground-truth boxes of this class, image pixels
    positive: bool | None  # ground-truth label when known


def reasoning_figure(image: np.ndarray, title: str, blocks: Sequence[ReasoningBlock], probabilities: dict[str, float],
                     path: Path, truth_boxes: dict[str, list] | None = None) -> Figure:
    """METHOD.md's reasoning figure: an overview (test image with its ground-truth boxes, P(c) of every
    disease), then per class a header with P(c) = sigma(l_c - l_NF), one row per prototype (test-image
    similarity | training patch | similarity x weight = contribution) and a footer summing to l_c. A row
    whose prototype matched test images with and without its class alike is titled and noted in red.
    Returns the figure, for inspection."""
    heights = [3.2]
    for block in blocks:
        heights += [0.55] + [1.9] * len(block.rows) + [0.5]
    top_margin = 0.9
    figure = _new_figure(10.5, sum(heights) + top_margin)
    figure.suptitle(title, fontsize=15, fontweight="bold", y=1 - 0.2 / (sum(heights) + top_margin))
    grid = figure.add_gridspec(len(heights), 3, height_ratios=heights, width_ratios=[1, 1, 2.4],
                               left=0.03, right=0.97, bottom=0.01, top=1 - top_margin / (sum(heights) + top_margin),
                               hspace=0.35, wspace=0.08)
    overview_grid = grid[0, :].subgridspec(1, 2, width_ratios=[1, 1.9], wspace=0.45)
    overview = to_rgb(image)
    for name, boxes in (truth_boxes or {}).items():
        for box in boxes:
            overview = draw_box(overview, box, TRUTH_COLOUR)
    axis = figure.add_subplot(overview_grid[0, 0])
    _show(axis, overview, "test image", fontsize=10)
    if truth_boxes:
        axis.set_xlabel("magenta: ground truth\n" + ", ".join(
            f"{name}: {len(boxes)} box{'es' if len(boxes) != 1 else ''}" for name, boxes in truth_boxes.items()), fontsize=8)
    bars = figure.add_subplot(overview_grid[0, 1])
    names = list(probabilities)
    values = [probabilities[name] for name in names]
    shown = {block.class_name for block in blocks}
    colours = ["tab:red" if name in shown else "tab:gray" for name in names]
    positions = np.arange(len(names))[::-1]
    bars.barh(positions, values, color=colours)
    bars.set_yticks(positions)
    bars.set_yticklabels(names, fontsize=9)
    bars.set_xlim(0, 1.15)
    bars.axvline(0.5, color="black", linewidth=0.6, linestyle=":")
    for position, value in zip(positions, values):
        bars.text(value + 0.01, position, f"{value:.3f}", va="center", fontsize=8)
    bars.set_title("P(disease) = σ(ℓ_c − ℓ_NF); red: explained below", fontsize=10)
    bars.tick_params(axis="x", labelsize=8)

    row = 1
    for block in blocks:
        header = figure.add_subplot(grid[row, :])
        header.axis("off")
        if block.probability is None:
            text = f"{block.class_name} (reference class):  ℓ_NF = {block.logit:.3f}"
        else:
            text = (f"{block.class_name}:  P = σ(ℓ − ℓ_NF) = σ({block.logit:.3f} − {block.reference_logit:.3f})"
                    f" = {block.probability:.3f}")
        if block.positive is not None:
            text += "    [ground truth: " + ("positive" if block.positive else "negative") + "]"
        header.text(0.0, 0.15, text, fontsize=13, fontweight="bold", transform=header.transAxes)
        row += 1
        for entry in block.rows:
            test_axis = figure.add_subplot(grid[row, 0])
            patch_axis = figure.add_subplot(grid[row, 1])
            text_axis = figure.add_subplot(grid[row, 2])
            _show(test_axis, annotate(image, entry.test_map, entry.test_box, block.truth_boxes),
                  "" if entry.unselective else f"test image × prototype {entry.prototype}", fontsize=9)
            if entry.unselective:
                _title_unselective(test_axis, entry.prototype, fontsize=9)
                text_axis.text(0.04, 0.84, f"matched test images with and without {block.class_name} alike:\n"
                               "it adds about this much to every image", fontsize=9, color=UNSELECTIVE_TITLE_COLOUR,
                               va="center", transform=text_axis.transAxes)
            _show(patch_axis, square_pad(entry.patch), f"training patch\n{entry.source_id}", fontsize=8)
            text_axis.axis("off")
            text_axis.text(0.04, 0.5, f"{entry.similarity:.3f} × {entry.weight:.3f} = {entry.contribution:.3f}",
                           fontsize=15, va="center", transform=text_axis.transAxes)
            text_axis.text(0.04, 0.18, "max similarity × last-layer weight = contribution", fontsize=8,
                           color="dimgray", va="center", transform=text_axis.transAxes)
            row += 1
        footer = figure.add_subplot(grid[row, :])
        footer.axis("off")
        parts = []
        if block.hidden_count:
            parts.append(f"+ {block.hidden_count} more prototypes of {block.class_name}: {block.hidden_contribution:.3f}")
        if abs(block.other_classes_contribution) > 0:
            parts.append(f"+ other classes' prototypes: {block.other_classes_contribution:.3f}")
        parts.append(f"logit ℓ({block.class_name}) = Σ contributions = {block.logit:.3f}")
        footer.text(0.0, 0.5, "    ".join(parts), fontsize=11, transform=footer.transAxes, va="center")
        row += 1
    figure.savefig(path)
    return figure
