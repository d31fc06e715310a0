"""TensorBoard event files of a run (``RUN/tensorboard/``), written by rank 0 alone.

One step axis for every tag: :attr:`utils.training.Trainer.global_step`, the optimizer steps taken
so far plus one per push. A stage's records sit at the step where it ended, so two stages never
share a step, and the checkpoint of a stage carries the last step it wrote. A resumed run opens the
writer with ``purge_step`` = that step + 1: TensorBoard then drops whatever an interrupted
invocation wrote after the checkpoint, and the resumed run continues the curves without overlap.

Tags (``<class>`` is a class name):

* ``train/<term>``, ``train/loss``: running means of the loss terms over ``--log-every`` steps,
  and over the steps left at the end of a stage (this process's batches; the per-stage means
  below are over all processes);
* ``stage/<term>``, ``stage/loss``: each epoch's mean, as in metrics.csv;
* ``lr/<group>``: the learning rates the stage trained with;
* ``val/mean_auc``, ``val/auc/<class>``: validation after every stage;
* ``push/...``: what a push produces (prototypes grounded, distinct source images, reused images,
  mean push distance, per class too) and ``push/gallery/<class>`` images;
* ``<split>/mean_auc``, ``<split>/auc/<class>``, ``test/roc``: the final report (test split and any
  extra test sets).

:meth:`TensorBoardLog.log_scalars` is the one entry point for further figures (e.g. prototype
quality after a push): ``log_scalars("push/quality", {...}, step)``.
"""
from __future__ import annotations

import io
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np

from utils.prototype_quality import quality_scalars
from utils.visualise import GalleryEntry, gallery_figure, iter_prototype_views, shrink

logger = logging.getLogger(__name__)

GALLERY_CELL_SIDE = 160  # px per picture in a TensorBoard gallery: small event files, still legible
GALLERY_MAX_SIDE = 2000  # px of a whole gallery image


def require_tensorboard() -> None:
    """Fail before a run starts (and before it creates anything) when the package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ValueError("TensorBoard logging needs the tensorboard package: pip install tensorboard "
                         "(or run with --no-tensorboard)") from None


class TensorBoardLog:
    """A SummaryWriter, or nothing: a disabled log (``log_dir`` None) accepts every call and writes
    nothing, so callers never branch on rank or on --no-tensorboard."""

    def __init__(self, log_dir: str | Path | None = None, purge_step: int | None = None):
        self.writer = None
        if log_dir is not None:
            # Optional dependency: a run with --no-tensorboard works without the package installed.
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
            logger.info("TensorBoard: %s%s", log_dir, f" (continuing at step {purge_step})" if purge_step else "")

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    # -- primitives ----------------------------------------------------------------------------
    def log_scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        """One scalar per entry, tagged ``prefix/key``; non-finite values (an undefined AUC) are skipped."""
        if self.writer is None:
            return
        for key, value in values.items():
            if value is None or not math.isfinite(float(value)):
                continue
            self.writer.add_scalar(f"{prefix}/{key}", float(value), step)

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """uint8 [H, W] grey or [H, W, 3] RGB."""
        if self.writer is None:
            return
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # -- what the run logs ---------------------------------------------------------------------
    def log_stage(self, terms: Mapping[str, float], validation: dict, rates: Mapping[str, float], step: int) -> None:
        """A finished stage: its mean loss terms, the learning rates it used, validation AUCs."""
        self.log_scalars("stage", terms, step)
        self.log_scalars("lr", {name.removeprefix("lr_"): value for name, value in rates.items()}, step)
        self.log_auc("val", validation, step)

    def log_auc(self, split: str, result: dict, step: int) -> None:
        """``per_class_auc``'s result: ``split/mean_auc`` and ``split/auc/<class>``."""
        self.log_scalars(split, {"mean_auc": result["mean_auc"]}, step)
        self.log_scalars(f"{split}/auc", result["auc"], step)

    def log_push(self, model, dataset, provenance: Sequence[dict], image_size: int, step: int,
                 batch_size: int = 16) -> None:
        """After a push: its figures, and one gallery image per class (source images with the
        similarity overlay and the patches, as push.py draws them)."""
        if self.writer is None:
            return
        self.log_scalars("push", push_summary(provenance, model.class_names), step)
        for class_name, image in gallery_images(model, dataset, image_size, batch_size).items():
            self.log_image(f"push/gallery/{class_name}", image, step)

    def log_final(self, results: dict, roc_png: Path | None, step: int) -> None:
        """The final report: AUCs of the test split and any extra test sets, and the ROC curves."""
        for split, result in results.items():
            if split in ("val", "best") or not isinstance(result, dict) or "mean_auc" not in result:
                continue
            self.log_auc(split, result, step)
        if roc_png is not None and Path(roc_png).is_file():
            self.log_image("test/roc", read_rgb(Path(roc_png)), step)
        if results.get("prototypes"):
            self.log_scalars("test/prototypes", quality_scalars(results["prototypes"]), step)
        localisation = {"test": results.get("localisation")}
        localisation.update({split: result.get("localisation") for split, result in results.items()
                             if split not in ("val", "test", "best") and isinstance(result, dict)})
        for split, report in localisation.items():
            for method, result in (report or {}).get("methods", {}).items():
                self.log_scalars(f"{split}/localisation/{method}",
                                 {key: result["mean"][key] for key in ("pointing", "iobb_0.5", "mean_iou")}, step)


def push_summary(provenance: Sequence[dict], class_names: Sequence[str]) -> dict[str, float]:
    """Figures of one push from its provenance records (utils/projection.py ``provenance_records``).

    pushed_prototypes: prototypes grounded on a training image; distinct_source_images: how many
    different images they came from (the non-repetitive rule makes this equal to the pushed count
    unless a class had too few images); reused_images: prototypes that had to take an image already
    used; per class, ``distinct_source_images/<class>``, ``mean_distance/<class>`` (mean squared
    distance between a prototype and the patch it was copied from, before the copy) and, for a push
    that recorded it, ``unused_before_push/<class>`` (share of the class's prototypes that were the
    nearest of the class to none of its training images at the push: L_clst was not pulling them).
    """
    pushed = [record for record in provenance if _is_pushed(record)]
    summary: dict[str, float] = dict(
        pushed_prototypes=float(len(pushed)),
        distinct_source_images=float(len({record["image_index"] for record in pushed})),
        reused_images=float(sum(bool(record.get("reused_image")) for record in pushed)),
    )
    images: dict[str, set] = defaultdict(set)
    distances: dict[str, list[float]] = defaultdict(list)
    for record in pushed:
        images[record["class_name"]].add(record["image_index"])
        distances[record["class_name"]].append(float(record["distance"]))
    unused: dict[str, list[bool]] = defaultdict(list)
    for record in provenance:
        if "nearest_before_push" in record:
            unused[record["class_name"]].append(record["nearest_before_push"] == 0)
    for name in class_names:
        summary[f"distinct_source_images/{name}"] = float(len(images[name]))
        if distances[name]:
            summary[f"mean_distance/{name}"] = float(np.mean(distances[name]))
        if unused[name]:
            summary[f"unused_before_push/{name}"] = float(np.mean(unused[name]))
    return summary


def _is_pushed(record: dict) -> bool:
    index = record.get("image_index")
    return index is not None and index >= 0


def figure_png_to_rgb(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("could not decode a rendered figure")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_rgb(path: Path) -> np.ndarray:
    return figure_png_to_rgb(path.read_bytes())


def gallery_images(model, dataset, image_size: int, batch_size: int = 16) -> dict[str, np.ndarray]:
    """One RGB gallery per class with pushed prototypes, rendered in memory (Agg canvas) by the
    figure push.py writes to disk (utils/visualise.py ``gallery_figure``)."""
    entries: dict[int, list] = defaultdict(list)
    for view in iter_prototype_views(model, dataset, image_size, batch_size=batch_size):
        entries[view.class_index].append(GalleryEntry.of(view, max_side=GALLERY_CELL_SIDE))
    images = {}
    for class_index in sorted(entries):
        buffer = io.BytesIO()
        gallery_figure(model.class_names[class_index], entries[class_index], buffer)
        images[model.class_names[class_index]] = shrink(figure_png_to_rgb(buffer.getvalue()), GALLERY_MAX_SIDE)
    return images
