"""Pre-flight checks: catch bad input before the first training step.

``data.pools.build_splits`` runs these for every file-based source, and ``main.train`` builds the
data before the run directory is created, so a failure leaves nothing that looks like a run behind.
Every failure is one :class:`data.base.DataError` whose message names the file, the column or the
images at fault; the command line turns it into one error line and exit status 2.

Checks, cheapest first:

* the configuration itself (image size, validation fraction);
* every split is non-empty, no image is in two splits (patients shared across splits: a warning);
* every listed image exists (one ``stat`` per file, which also feeds the cache key);
* every image decodes and is not absurdly small. Decoding 112k PNGs takes minutes, so it runs in
  threads (OpenCV releases the GIL) with a progress bar, and the cache build does it as a side
  effect (:func:`scan_images` is shared), so a cached run decodes each image once, ever.
"""
from __future__ import annotations

import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from data.base import DataError, UnreadableImage

logger = logging.getLogger(__name__)

MIN_IMAGE_SIZE = 32  # the backbones have stride 32: below this there is no feature map at all
MAX_IMAGE_SIZE = 4096
MIN_SOURCE_SIDE = 32  # a decoded image smaller than this is a thumbnail or a broken export
SHOWN_OFFENDERS = 5


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def describe_offenders(problems: Sequence[tuple[str, str]], total: int, what: str) -> str:
    """'3 of 120 images cannot be decoded: a.png (reason); b.png (reason); ... and 1 more'."""
    shown = "; ".join(f"{path} ({reason})" if reason else str(path) for path, reason in problems[:SHOWN_OFFENDERS])
    more = f"; ... and {len(problems) - SHOWN_OFFENDERS} more" if len(problems) > SHOWN_OFFENDERS else ""
    return f"{len(problems)} of {plural(total, 'image')} {what}: {shown}{more}"


def thread_count(config) -> int:
    return config.decode_threads or min(32, (os.cpu_count() or 1) * 2)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
def check_config(config, carves_validation: bool) -> None:
    size = config.image_size
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise DataError(
            f"--image-size {size} is not a usable training resolution: the backbone has stride 32, so it must be "
            f"between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} px (the paper uses 512)"
        )
    if size % 32:
        logger.warning("--image-size %d is not a multiple of 32: the border rows of the feature map are cropped", size)
    if config.crop_margin < 1.0:
        raise DataError(f"--crop-margin {config.crop_margin} must be at least 1 (it is the augmentation margin over the image size)")
    if carves_validation and not 0.0 < config.val_fraction < 1.0:
        raise DataError(f"--val-fraction {config.val_fraction} must be between 0 and 1 (exclusive) to carve a validation split")


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------
def check_splits(splits: dict[str, tuple[Sequence[Path], Sequence[str] | None]], sources: dict[str, str]) -> None:
    """splits: name -> (image paths, patient ids or None); sources: name -> where the split came from.

    Raises on an empty split or an image listed in two splits; warns on patients shared by splits.
    """
    for name, (paths, _) in splits.items():
        if len(paths) == 0:
            raise DataError(f"the {name} split is empty ({sources.get(name, 'no source')}): no labelled images to use")
    names = list(splits)
    resolved = {name: {os.path.normpath(str(path)) for path in splits[name][0]} for name in names}
    for first_index, first in enumerate(names):
        for second in names[first_index + 1 :]:
            shared = sorted(resolved[first] & resolved[second])
            if shared:
                examples = ", ".join(Path(path).name for path in shared[:SHOWN_OFFENDERS])
                raise DataError(
                    f"the {first} and {second} splits share {plural(len(shared), 'image')} (e.g. {examples}); "
                    f"splits must be disjoint ({sources.get(first, first)} vs {sources.get(second, second)})"
                )
            first_patients, second_patients = splits[first][1], splits[second][1]
            if first_patients is not None and second_patients is not None:
                common = set(first_patients) & set(second_patients)
                if common:
                    logger.warning("the %s and %s splits share %d patients (e.g. %s): results may be optimistic",
                                   first, second, len(common), ", ".join(sorted(map(str, common))[:3]))


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def warn_if_upsampled(source_sizes: np.ndarray, image_size: int, what: str) -> None:
    """Training above the images' own resolution only blurs them: say so (a resized copy of NIH?)."""
    if len(source_sizes) and float(np.median(source_sizes.min(axis=1))) < image_size:
        logger.warning("the images of %s are smaller than --image-size %d (median shorter side %d px): "
                       "they are upsampled", what, image_size, int(np.median(source_sizes.min(axis=1))))


def stat_images(paths: Sequence[Path], what: str) -> list[tuple[int, int]]:
    """(size, mtime_ns) per file; raises naming the missing ones. ``what`` says where they were listed."""
    stats, missing = [], []
    for path in paths:
        try:
            status = os.stat(path)
        except OSError:
            missing.append((str(path), ""))
            stats.append((-1, -1))
            continue
        if not stat.S_ISREG(status.st_mode):
            missing.append((str(path), "not a file"))
        stats.append((status.st_size, status.st_mtime_ns))
    if missing:
        raise DataError(describe_offenders(missing, len(paths), f"listed in {what} do not exist"))
    return stats


def scan_images(
    dataset,
    on_image: Callable[[int, np.ndarray], None] | None = None,
    threads: int = 4,
    desc: str = "checking images",
) -> list[tuple[str, str]]:
    """Decode every image of ``dataset`` (``load_image``) in threads; return the offenders.

    ``on_image(index, image)`` receives each good image (the cache writes it out); it is called from
    worker threads, one index at a time per thread. Offenders are (path, reason) in index order.
    """
    paths = getattr(dataset, "image_paths", None) or dataset.image_ids

    def visit(index: int) -> tuple[int, str | None]:
        try:
            image = dataset.load_image(index)
        except UnreadableImage as error:
            return index, error.reason
        except DataError as error:
            return index, str(error)
        height, width = image.shape[:2]
        if min(height, width) < MIN_SOURCE_SIDE:
            return index, f"{width}x{height} px, smaller than {MIN_SOURCE_SIDE} px"
        if on_image is not None:
            on_image(index, image)
        return index, None

    problems: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        futures = [pool.submit(visit, index) for index in range(len(dataset))]
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="img",
                               leave=False, mininterval=1.0, disable=len(futures) < 64):
                index, reason = future.result()
                if reason is not None:
                    problems[index] = reason
        except BaseException:  # Ctrl-C: do not leave thousands of queued decodes running
            for future in futures:
                future.cancel()
            raise
    return [(str(paths[index]), problems[index]) for index in sorted(problems)]


def check_decodable(dataset, what: str, threads: int) -> None:
    """Decode every image once (used without the cache, which does this while it is built)."""
    problems = scan_images(dataset, threads=threads, desc=f"checking {what}")
    if problems:
        raise DataError(describe_offenders(problems, len(dataset), f"of {what} cannot be used"))
