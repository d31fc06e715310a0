"""Cost of a push (utils.projection.push_prototypes) over one plain inference pass on the same images.

    python bench/push.py                          # CPU defaults: ResNet-18, 128 px, 400 synthetic images
    python bench/push.py --device cuda --backbone densenet121 --image-size 512 --images 2000

Both go through the same DataLoader over the same deterministic push set (EvalTransform), so image
decoding and resizing count alike. The inference pass is the full CIPL forward (logits); the push is the
scan, the non-repetitive selection and the second pass over the chosen images. Runs of the two
alternate so machine noise hits both alike; the ratio of medians is printed against the target <= 1.3x,
with the push's own phases for orientation.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets import EvalTransform, SyntheticChestXrays, TransformedDataset  # noqa: E402
from model import CIPL  # noqa: E402
from utils import projection  # noqa: E402

TARGET = 1.3


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=400, help="synthetic training images in the push set")
    parser.add_argument("--prototypes-per-class", type=int, default=8)
    parser.add_argument("--prototype-dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (after one warm-up run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return parser


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Wraps projection's phase functions to time them (the push's own breakdown)."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.originals = {}

    def wrap(self, name: str, device: torch.device) -> None:
        original = getattr(projection, name)
        self.originals[name] = original

        def timed(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            result = original(*args, **kwargs)
            synchronize(device)
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
            return result

        setattr(projection, name, timed)

    def restore(self) -> None:
        for name, original in self.originals.items():
            setattr(projection, name, original)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = SyntheticChestXrays("train", args.images, args.image_size, seed=0)
    dataset = TransformedDataset(base, EvalTransform(args.image_size))
    torch.manual_seed(0)
    model = CIPL(base.class_names, backbone=args.backbone, prototype_dim=args.prototype_dim,
                 prototypes_per_class=args.prototypes_per_class).to(device).eval()
    initial = model.prototypes.detach().clone()

    @torch.no_grad()
    def inference() -> None:
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
        for batch in loader:
            model(batch["image"].to(device)).logits.cpu()

    def push() -> None:
        model.prototypes.data.copy_(initial)  # every push starts from the same prototypes
        projection.push_prototypes(model, dataset, device, batch_size=args.batch_size, progress=False,
                                   image_ids=base.image_ids)

    def timed(function) -> float:
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        return time.perf_counter() - start

    inference()
    push()
    inference_times, push_times = [], []
    clock = PhaseClock()
    for name in ("scan_push_set", "select_nonrepetitive"):
        clock.wrap(name, device)
    try:
        for _ in range(args.repeats):
            inference_times.append(timed(inference))
            push_times.append(timed(push))
    finally:
        clock.restore()

    inference_median = statistics.median(inference_times)
    push_median = statistics.median(push_times)
    ratio = push_median / inference_median
    scan = clock.totals.get("scan_push_set", 0.0) / args.repeats
    select = clock.totals.get("select_nonrepetitive", 0.0) / args.repeats
    rest = sum(push_times) / args.repeats - scan - select
    print(f"push benchmark: {args.backbone}, {args.image_size} px, {args.images} images, "
          f"{model.num_prototypes} prototypes (D={args.prototype_dim}), batch {args.batch_size}, "
          f"device {device}, {torch.get_num_threads()} threads, {args.repeats} alternating runs")
    print(f"  inference pass (median): {inference_median:8.3f} s   runs: " + ", ".join(f"{t:.3f}" for t in inference_times))
    print(f"  push           (median): {push_median:8.3f} s   runs: " + ", ".join(f"{t:.3f}" for t in push_times))
    print(f"  push phases (mean): scan {scan:.3f} s, select {select:.3f} s, "
          f"copy features of the chosen images + provenance {rest:.3f} s")
    verdict = "within" if ratio <= TARGET else "OVER"
    print(f"  ratio push / inference: {ratio:.3f}x  ({verdict} the target of {TARGET}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
