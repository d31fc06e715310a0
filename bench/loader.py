"""How fast does the training loader feed the model: from the image cache vs from the PNG files.

    python bench/loader.py                    # 200 NIH-like 1024-px grey PNGs, training at 512 px
    python bench/loader.py --size 256 --images 100 --workers 2

It writes synthetic radiograph-like PNGs (smooth anatomy plus noise, so they compress like the NIH
release, about 0.5 MB each) into a temporary folder, builds the cache for them once, then reads the
*same* images in the same order through the same loaders, once from the files and once from the
cache, and prints images/s side by side:

* ``load + resize``: what the loader must do before any augmentation (decode, resize to the
  training resolution, float + normalise as ``EvalTransform``) -- the part the cache removes; the
  ``uint8`` row leaves float conversion and normalisation to the GPU, as a loader should;
* ``warm-up loader``: DataLoader over ``SingleViewTransform`` (one augmented view per image);
* ``paired loader``: DataLoader over ``PairedTwoViewDataset`` with ``TwoViewTransform`` (two views
  per image, two images per pair), what the paired stage runs;

and the per-image cost of the two-view transform alone, on a cached image and on a full-size one.
Files already sit in the page cache when they are read, so the raw numbers are a best case (no disk).
With the default ``--workers 0 --threads 1`` the numbers are per CPU core, as each DataLoader worker
runs; a machine with W free cores feeds about W times as many images per second.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchvision.transforms import v2  # noqa: E402

from data import image_cache, preflight  # noqa: E402
from data.nih import NIH_CLASS_NAMES  # noqa: E402
from data.pools import FileImageDataset  # noqa: E402
from datasets import (  # noqa: E402
    EvalTransform, PairedTwoViewDataset, SingleViewTransform, TransformedDataset, TwoViewTransform, to_image_tensor,
)
from settings import preset_config  # noqa: E402


def radiograph(side: int, seed: int) -> np.ndarray:
    """A smooth chest-like image with film grain; compresses like a real PNG radiograph."""
    rng = np.random.default_rng(seed)
    small = rng.normal(0, 1, (16, 16)).astype(np.float32)
    field = cv2.resize(cv2.GaussianBlur(small, (5, 5), 2), (side, side), interpolation=cv2.INTER_CUBIC)
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) / side
    lungs = np.exp(-(((xs - 0.32) / 0.16) ** 2 + ((ys - 0.5) / 0.3) ** 2)) + np.exp(-(((xs - 0.68) / 0.16) ** 2 + ((ys - 0.5) / 0.3) ** 2))
    image = 150 + 30 * field - 90 * lungs + rng.normal(0, 6, (side, side)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_images(folder: Path, count: int, side: int) -> list[Path]:
    paths = []
    for index in range(count):
        path = folder / f"{index:08d}_000.png"
        cv2.imwrite(str(path), radiograph(side, index))
        paths.append(path)
    return paths


class ResizeOnly:
    """uint8 [C, S, S]: what a loader hands over when normalisation happens on the device."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        tensor = to_image_tensor(image)
        if tensor.shape[-2:] != (self.size, self.size):
            tensor = v2.functional.resize(tensor, [self.size, self.size], antialias=True)
        return tensor


def side_by_side(datasets: dict, wrap, items: list, images_per_item: int, workers: int, batch_size: int,
                 rounds: int = 4) -> dict:
    """images/s of the same loader over each dataset, on the same items in the same order.

    The items are split into ``rounds`` chunks and the datasets take turns chunk by chunk, so a
    busy machine slows both sides alike instead of whichever happened to run second.
    """
    seconds = dict.fromkeys(datasets, 0.0)
    counts = dict.fromkeys(datasets, 0)
    size = -(-len(items) // rounds)
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        for name, dataset in datasets.items():
            loader = DataLoader(wrap(dataset), batch_size=batch_size, sampler=chunk, num_workers=workers)
            began = time.perf_counter()
            for batch in loader:
                counts[name] += (batch["image"] if "image" in batch else batch["views"]).shape[0] * images_per_item
            seconds[name] += time.perf_counter() - began
    return {name: counts[name] / seconds[name] for name in datasets}


def measure(datasets: dict, config, order: list, pairs: list, workers: int, batch_size: int) -> dict:
    """{loader: {dataset: images/s}}; ``order``: all images, ``pairs``: the (fewer) augmented ones."""
    size = config.image_size
    singles = [(anchor, seed) for anchor, _, seed in pairs]  # (index, augmentation seed), as the sampler yields
    return {
        "load + resize (float)": side_by_side(datasets, lambda d: TransformedDataset(d, EvalTransform(size)), order, 1, workers, batch_size),
        "load + resize (uint8)": side_by_side(datasets, lambda d: TransformedDataset(d, ResizeOnly(size)), order, 1, workers, batch_size),
        "warm-up loader (one view)": side_by_side(datasets, lambda d: TransformedDataset(d, SingleViewTransform(config)), singles, 1, workers, batch_size),
        "paired loader (two views)": side_by_side(datasets, lambda d: PairedTwoViewDataset(d, TwoViewTransform(config)), pairs, 2, workers, batch_size // 2),
    }


def transform_costs(datasets: dict, config, count: int) -> dict:
    """ms per image of TwoViewTransform (both views), input already decoded; same seeds per image."""
    transform = TwoViewTransform(config)
    images = {name: [dataset.load_image(i) for i in range(count)] for name, dataset in datasets.items()}
    seconds = dict.fromkeys(datasets, 0.0)
    for index in range(count):
        for name in datasets:
            torch.manual_seed(index)
            began = time.perf_counter()
            transform(images[name][index])
            seconds[name] += time.perf_counter() - began
    return {name: 1000 * seconds[name] / count for name in datasets}


def transform_breakdown(image: np.ndarray, config, repeats: int = 5) -> list[tuple[str, float]]:
    """Median ms per call of each step of TwoViewTransform on one decoded image."""
    transform = TwoViewTransform(config)
    tensor = to_image_tensor(image)

    def cost(step, value) -> float:
        step(value)
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            step(value)
            times.append(time.perf_counter() - began)
        return 1000 * float(np.median(times))

    def label(op) -> str:
        if isinstance(op, v2.RandomApply):
            return f"{type(op.transforms[0]).__name__} (p={op.p})"
        return type(op).__name__

    def unwrap(op):
        return op.transforms[0] if isinstance(op, v2.RandomApply) else op

    shared = transform.shared.transforms
    cropped = shared[0](tensor)
    rows = [("shared RandomResizedCrop", cost(shared[0], tensor))]
    rows += [(f"  one of 6: {label(op)}", cost(op, cropped)) for op in shared[1].transforms]
    rows += [("shared flips + RandomAffine", sum(cost(op, cropped) for op in shared[2:]))]
    rows += [(f"per view (x2): {label(op)}", cost(unwrap(op), cropped)) for op in transform.per_view.transforms]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="number of generated PNGs")
    parser.add_argument("--source-size", type=int, default=1024, help="side of the generated PNGs (NIH: 1024)")
    parser.add_argument("--size", type=int, default=512, help="training resolution (the paper: 512)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (pairs: half)")
    parser.add_argument("--augmented", type=int, default=32,
                        help="images through the augmenting loaders (they cost ~0.1-0.5 s each on a CPU core)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in this process (1 = what each DataLoader worker gets)")
    parser.add_argument("--folder", default="", help="keep the images and the cache here (default: a temp folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="cipl-bench-") as temporary:
        folder = Path(args.folder or temporary)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        paths = make_images(folder / "images", args.images, args.source_size)
        megabytes = sum(p.stat().st_size for p in paths) / 2**20
        print(f"{args.images} PNGs of {args.source_size} px ({megabytes / args.images:.2f} MB each) written in "
              f"{time.perf_counter() - began:.1f} s; training resolution {args.size} px, {args.workers} workers, "
              f"torch threads {torch.get_num_threads()}")

        config = preset_config("nih", data_root=str(folder), image_size=args.size, cache_dir=str(folder / "cache"))
        rng = np.random.default_rng(0)
        targets = (rng.random((args.images, len(NIH_CLASS_NAMES))) < 0.1).astype(np.float32)
        targets[:, -1] = targets[:, :-1].sum(axis=1) == 0
        raw = FileImageDataset("bench", str(folder), paths, [p.name for p in paths], targets, NIH_CLASS_NAMES, channels=1)
        stats = preflight.stat_images(paths, "the benchmark")
        began = time.perf_counter()
        cached = image_cache.cached_dataset(raw, config, "bench", stats)
        build = time.perf_counter() - began
        print(f"cache built once in {build:.1f} s ({args.images / build:.0f} images/s with "
              f"{preflight.thread_count(config)} threads): {cached.side} px, "
              f"{cached.array_path.stat().st_size / 2**20:.0f} MB for {args.images} images")

        order = [int(i) for i in rng.permutation(args.images)]
        count = min(args.augmented, args.images) // 2
        # Paired-loader items as ClassBalancedSampler yields them: (anchor, partner, augmentation seed).
        pairs = [(a, b, seed) for seed, (a, b) in enumerate(zip(order[:count], order[count : 2 * count]))]
        results = measure(dict(files=raw, cache=cached), config, order, pairs, args.workers, args.batch_size)
        print()
        print(f"{'images/s':28s} {'files':>10s} {'cache':>10s} {'cache/files':>12s}")
        for name, speed in results.items():
            print(f"{name:28s} {speed['files']:10.1f} {speed['cache']:10.1f} {speed['cache'] / speed['files']:11.2f}x")
        print()
        count = min(args.images, args.augmented)
        costs = transform_costs(dict(cache=cached, files=raw), config, count)
        print(f"TwoViewTransform, both views of one image (decode not included), mean of {count} images: "
              f"{costs['cache']:.1f} ms from a {cached.side}-px cached image, "
              f"{costs['files']:.1f} ms from a {args.source_size}-px file")
        print(f"its steps on a {cached.side}-px image, median ms per call (the 'one of 6' ops run for 1 image in 6):")
        for name, milliseconds in transform_breakdown(cached.load_image(0), config):
            print(f"  {name:40s} {milliseconds:8.1f}")

if __name__ == "__main__":
    main()
