"""A one-time image cache: every image decoded and resized once, then memory-mapped.

Why: decoding 1024-px PNGs (NIH) or 3-megapixel JPEGs (ODIR) and augmenting them from full size on
the CPU bounds an epoch on a GPU machine. Training only ever looks at ``crop_margin x image_size``
pixels (the random resized crop's output), so each image is resized once to that square and stored
as one row of a uint8 array on disk; a training step then reads a few hundred kilobytes from the
page cache instead of decoding a file.

Layout, per *pool* (an image list as published: NIH's train_val and test lists, an ODIR annotation
file, a user CSV; the train/validation split is a view on a pool, so a new ``--val-fraction`` does
not rebuild anything)::

    <cache_dir>/<pool>-<side>px-<key>.npy    uint8 [N, side, side] (grey) or [N, side, side, 3]
    <cache_dir>/<pool>-<side>px-<key>.json   index: key, shape, each source image's (height, width)

``key`` hashes the file list with every file's size and modification time, the side and the
channel count: a changed, added or replaced image, or another resolution, means another key, and
the stale cache of that pool and side is removed. The array is written under a temporary name and
renamed, then the index is written and renamed; the index is the seal, so an interrupted build
(Ctrl-C, a full disk, a killed job) is never taken for a whole cache, it is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from data import preflight
from data.base import DataError, MultiLabelDataset

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def cache_side(config) -> int:
    """Pixels per side of a cached image: the training resolution plus the augmentation margin."""
    return math.ceil(config.crop_margin * config.image_size)


def default_cache_dir(config) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    if config.data_root and os.access(config.data_root, os.W_OK):
        return Path(config.data_root) / ".cipl-cache"
    return Path.home() / ".cache" / "cipl"


def cache_key(paths: Sequence[Path], stats: Sequence[tuple[int, int]], side: int, channels: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, side, channels, len(paths)]).encode())
    for path, (size, mtime) in zip(paths, stats):
        digest.update(f"\n{os.path.abspath(path)}\t{size}\t{mtime}".encode())
    return digest.hexdigest()


def resize_square(image: np.ndarray, side: int) -> np.ndarray:
    """Resize to side x side (the model sees square inputs; boxes are rescaled per axis)."""
    height, width = image.shape[:2]
    if (height, width) == (side, side):
        return image
    shrinking = height * width > side * side
    return cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


class CachedDataset(MultiLabelDataset):
    """A pool whose ``load_image`` reads the memory-mapped cache; labels and ids are the pool's.

    Boxes are rescaled from each source image's frame into the cached side x side frame. The array
    is opened lazily (and again in each DataLoader worker), so pickling the dataset stays cheap.
    """

    def __init__(self, base: MultiLabelDataset, array_path: Path, source_sizes: np.ndarray, side: int):
        self.name = getattr(base, "name", "cached")
        self.source = getattr(base, "source", "")
        self.channels = getattr(base, "channels", 1)
        self.image_ids = list(base.image_ids)
        self.image_paths = list(getattr(base, "image_paths", base.image_ids))
        self.patient_ids = getattr(base, "patient_ids", None)
        self.targets = base.targets
        self.class_names = list(base.class_names)
        self.side = side
        self.source_sizes = source_sizes  # [N, 2] (height, width) of each source image
        self.array_path = Path(array_path)
        self._array: np.ndarray | None = None
        self.boxes = {}
        for index, boxes in (base.boxes or {}).items():
            height, width = (float(v) for v in source_sizes[index])
            scale_x, scale_y = side / width, side / height
            self.boxes[index] = [(c, x * scale_x, y * scale_y, w * scale_x, h * scale_y) for c, x, y, w, h in boxes]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def load_image(self, index: int) -> np.ndarray:
        if self._array is None:
            try:
                self._array = np.load(self.array_path, mmap_mode="r")
            except FileNotFoundError:
                raise DataError(f"the image cache {self.array_path} disappeared during the run (another run rebuilt "
                                f"it after its source images changed?); start again") from None
        return np.array(self._array[index])  # a private, writable copy: transforms may work in place


def _index_path(array_path: Path) -> Path:
    return array_path.with_suffix(".json")


def _read_index(array_path: Path, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The source sizes of a complete cache with this key and shape, or None."""
    index_path = _index_path(array_path)
    try:
        index = json.loads(index_path.read_text())
        if index.get("version") != CACHE_VERSION or index.get("key") != key or tuple(index.get("shape", ())) != shape:
            return None
        array = np.load(array_path, mmap_mode="r")
        if array.shape != shape or array.dtype != np.uint8:
            return None
        return np.asarray(index["source_sizes"], dtype=np.int64).reshape(shape[0], 2)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale(directory: Path, stem: str, keep: Path) -> None:
    """Older caches of this pool and side (the source changed) and partial files of dead builds."""
    for path in directory.glob(f"{stem}-*"):
        if path in (keep, _index_path(keep)):
            continue
        if ".partial-" in path.name:
            pid = path.name.rsplit(".partial-", 1)[1]
            if pid.isdigit() and _process_alive(int(pid)):
                continue  # another process is building right now
        elif path.suffix not in (".npy", ".json"):
            continue
        logger.info("removing stale cache file %s", path)
        path.unlink(missing_ok=True)


def cached_dataset(base, config, pool_name: str, stats: Sequence[tuple[int, int]]) -> CachedDataset:
    """The cached form of ``base`` (a pool with ``image_paths`` and ``channels``), building it if needed.

    ``stats`` are the (size, mtime_ns) of ``base.image_paths`` from the existence check. Building
    decodes every image, so it is also the pre-flight decode check: offenders raise DataError and
    nothing is kept.
    """
    side = cache_side(config)
    channels = base.channels
    shape = (len(base), side, side) if channels == 1 else (len(base), side, side, 3)
    key = cache_key(base.image_paths, stats, side, channels)
    directory = default_cache_dir(config)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the image cache folder {directory}: {error}; choose --cache-dir or use --no-cache") from None
    stem = f"{pool_name}-{side}px"
    array_path = directory / f"{stem}-{key[:16]}.npy"

    source_sizes = _read_index(array_path, key, shape)
    if source_sizes is not None:
        logger.info("using the image cache %s (%d images, %d px)", array_path, len(base), side)
        preflight.warn_if_upsampled(source_sizes, config.image_size, base.source or pool_name)
        return CachedDataset(base, array_path, source_sizes, side)

    _remove_stale(directory, stem, array_path)
    needed = int(np.prod(shape, dtype=np.int64)) + 4096
    free = shutil.disk_usage(directory).free
    if free < needed * 1.05:
        raise DataError(
            f"the image cache of {pool_name} needs {needed / 2**30:.1f} GiB in {directory} but only "
            f"{free / 2**30:.1f} GiB are free; choose --cache-dir elsewhere or use --no-cache"
        )
    logger.info("building the image cache %s (%d images at %d px, %.2f GiB, once)", array_path, len(base), side, needed / 2**30)
    partial = directory / f"{array_path.name}.partial-{os.getpid()}"
    sizes = np.zeros((len(base), 2), dtype=np.int64)
    try:
        array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)

        def store(index: int, image: np.ndarray) -> None:
            sizes[index] = image.shape[:2]
            array[index] = resize_square(image, side)

        problems = preflight.scan_images(base, store, preflight.thread_count(config), desc=f"caching {pool_name}")
        if problems:
            raise DataError(preflight.describe_offenders(problems, len(base), f"of {base.source or pool_name} cannot be used"))
        array.flush()
        del array
        os.replace(partial, array_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    index = dict(version=CACHE_VERSION, key=key, pool=pool_name, side=side, channels=channels, shape=list(shape),
                 source=str(getattr(base, "source", "")), source_sizes=sizes.tolist())
    temporary = _index_path(array_path).with_name(_index_path(array_path).name + f".partial-{os.getpid()}")
    temporary.write_text(json.dumps(index))
    os.replace(temporary, _index_path(array_path))  # the seal: only now is the cache complete
    preflight.warn_if_upsampled(sizes, config.image_size, base.source or pool_name)
    return CachedDataset(base, array_path, sizes, side)
