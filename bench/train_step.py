"""Cost of CIPL's training step and of its co-attention, measured side by side in one run.

    python bench/train_step.py                    # CPU defaults (ResNet-18, 128 px, 8 pairs)
    python bench/train_step.py --device cuda --backbone densenet121 --image-size 512 --pairs 24

1. One paired CIPL step (student on x, EMA teacher on x', co-attention, all six loss terms,
   optimizer step, EMA update) over one step of a plain multi-label classifier (same backbone,
   global average pooling, linear head, BCE) on the same 2B images. Steps of the two alternate so
   machine noise hits both alike; the ratio of medians is printed. Target <= 1.6x.
2. Peak memory of the co-attention (forward + backward) against the naive version that broadcasts
   the B x D x N x N difference tensor, at D = 256 and 16 x 16 maps. Target >= 50x less.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import losses  # noqa: E402
from model import CIPL, EmaTeacher, build_backbone, co_attention  # noqa: E402
from settings import preset_config  # noqa: E402
from utils.training import loss_weights, paired_terms  # noqa: E402


class PlainClassifier(nn.Module):
    """The black-box baseline: backbone, global average pooling, one linear layer."""

    def __init__(self, backbone: str, num_diseases: int):
        super().__init__()
        self.backbone, channels = build_backbone(backbone)
        self.head = nn.Linear(channels, num_diseases)

    def forward(self, images):
        return self.head(self.backbone(images).mean(dim=(2, 3)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time_ratio(args, device: torch.device) -> dict:
    config = preset_config(
        "synthetic", backbone=args.backbone, image_size=args.image_size, prototype_dim=args.prototype_dim,
        prototypes_per_class=args.prototypes_per_class, batch_size=args.pairs,
    )
    class_names = [f"disease {c}" for c in range(args.diseases)] + ["No Finding"]
    torch.manual_seed(0)
    cipl = CIPL(class_names, backbone=args.backbone, prototype_dim=args.prototype_dim,
                prototypes_per_class=args.prototypes_per_class).to(device)
    cipl.last_layer.requires_grad_(False)  # frozen outside the last-layer stage, as in training
    teacher = EmaTeacher(cipl, config.ema_decay)
    plain = PlainClassifier(args.backbone, args.diseases).to(device)
    cipl_optimizer = torch.optim.Adam([p for p in cipl.parameters() if p.requires_grad], lr=1e-4)
    plain_optimizer = torch.optim.Adam(plain.parameters(), lr=1e-4)
    weights = loss_weights(config)

    images = torch.randn(2 * args.pairs, 3, args.image_size, args.image_size, device=device)
    images_prime = images + 0.01 * torch.randn_like(images)
    targets = (torch.rand(2 * args.pairs, args.diseases + 1, device=device) < 0.3).float()
    targets[:, -1] = (targets[:, :-1].sum(1) == 0).float()

    def cipl_step():
        terms = paired_terms(cipl, teacher, images, images_prime, targets, config, cipl.prototype_class)
        loss = losses.combine_losses(terms, weights)
        cipl_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        cipl_optimizer.step()
        teacher.update(cipl)

    def plain_step():
        loss = nn.functional.binary_cross_entropy_with_logits(plain(images), targets[:, :-1])
        plain_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        plain_optimizer.step()

    def timed(step) -> float:
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        cipl_step()
        plain_step()
    cipl_times, plain_times = [], []
    for _ in range(args.steps):
        cipl_times.append(timed(cipl_step))
        plain_times.append(timed(plain_step))
    cipl_median, plain_median = statistics.median(cipl_times), statistics.median(plain_times)
    return dict(cipl=cipl_median, plain=plain_median, ratio=cipl_median / plain_median)


def naive_co_attention(features_a, features_b):
    """The obvious version: the full B x D x Na x Nb difference tensor."""
    batch, dim, height, width = features_a.shape
    flat_a, flat_b = features_a.flatten(2), features_b.flatten(2)
    difference = flat_a.unsqueeze(3) - flat_b.unsqueeze(2)  # [B, D, Na, Nb]
    affinity = -difference.pow(2).sum(1)  # [B, Na, Nb]
    b_at_a = torch.bmm(flat_b, torch.softmax(affinity, dim=2).transpose(1, 2))
    a_at_b = torch.bmm(flat_a, torch.softmax(affinity, dim=1))
    return b_at_a.view(batch, dim, height, width), a_at_b.view(batch, dim, height, width)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_bytes(function, device: torch.device) -> int:
    """Peak extra memory of function(): CUDA allocator peak, or on the CPU the growth of the
    process's resident high-water mark (reset through /proc/self/clear_refs)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        function()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as stream:
        stream.write("5")  # reset VmHWM to the current resident size
    function()
    return max(0, _status_kib("VmHWM") - before) * 1024


def co_attention_peak(variant: str, pairs: int, device: torch.device) -> int:
    """Peak memory of one co-attention forward + backward (run in a fresh process per variant)."""
    torch.manual_seed(0)
    shape = (pairs, 256, 16, 16)
    features_a = torch.rand(shape, device=device, requires_grad=True)
    features_b = torch.rand(shape, device=device, requires_grad=True)
    function = co_attention if variant == "efficient" else naive_co_attention
    # Start autograd's engine and the thread pools on a tiny input first: one-off costs, not the op's.
    small = torch.rand(1, 256, 2, 2, device=device, requires_grad=True)
    sum(output.sum() for output in function(small, small.detach().clone())).backward()

    def go():
        b_at_a, a_at_b = function(features_a, features_b)
        (b_at_a.sum() + a_at_b.sum()).backward()

    return peak_memory_bytes(go, device)


def co_attention_memory(args, device: torch.device) -> dict:
    """Each variant in its own fresh process, so neither inherits the other's freed-but-resident pages."""
    peaks = {}
    for variant in ("efficient", "naive"):
        command = [sys.executable, __file__, "--memory-worker", variant, "--pairs", str(args.pairs), "--device", str(device)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        peaks[variant] = int(output.strip().splitlines()[-1])
    return dict(peaks, ratio=peaks["naive"] / max(peaks["efficient"], 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (2x images)")
    parser.add_argument("--diseases", type=int, default=14)
    parser.add_argument("--prototype-dim", type=int, default=256)
    parser.add_argument("--prototypes-per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-worker", choices=("efficient", "naive"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.memory_worker:
        print(co_attention_peak(args.memory_worker, args.pairs, device))
        return 0

    timing = step_time_ratio(args, device)
    print(f"device {device}, {args.backbone} @ {args.image_size} px, {args.pairs} pairs ({2 * args.pairs} images), "
          f"D={args.prototype_dim}, {args.prototypes_per_class * (args.diseases + 1)} prototypes")
    print(f"paired CIPL step {timing['cipl'] * 1e3:8.1f} ms | plain classifier step {timing['plain'] * 1e3:8.1f} ms "
          f"| ratio {timing['ratio']:.2f}x (target <= 1.6x)")
    memory = co_attention_memory(args, device)
    print(f"co-attention peak memory (D=256, 16x16 maps, {args.pairs} pairs): efficient {memory['efficient'] / 2**20:.1f} MiB "
          f"| naive D x N x N {memory['naive'] / 2**20:.1f} MiB | naive/efficient {memory['ratio']:.0f}x (target >= 50x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
