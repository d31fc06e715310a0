"""Training throughput of the paired CIPL step, in images per second (student views).

    python bench/throughput.py                                   # one process
    torchrun --nproc_per_node=2 bench/throughput.py              # DDP, same global batch
    python bench/throughput.py --device cuda --backbone densenet121 --image-size 512 --amp bf16 --channels-last

Random images (no data loading): it measures the network, the losses, the optimizer, the EMA
update and, under torchrun, gradient synchronisation. Prints one JSON line from rank 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import losses  # noqa: E402
from model import CIPL, EmaTeacher  # noqa: E402
from settings import preset_config  # noqa: E402
from utils.distributed import destroy, init_distributed_mode  # noqa: E402
from utils.training import loss_weights, paired_terms, resolve_device  # noqa: E402


def measure(args) -> dict:
    context = init_distributed_mode(args.device)
    device = resolve_device(args.device, context)
    if args.pairs % context.world_size:
        raise SystemExit(f"--pairs {args.pairs} is not divisible by {context.world_size} processes")
    local_pairs = args.pairs // context.world_size
    config = preset_config("synthetic", backbone=args.backbone, image_size=args.image_size,
                           prototype_dim=args.prototype_dim, prototypes_per_class=args.prototypes_per_class)
    torch.manual_seed(0)
    class_names = [f"disease {c}" for c in range(args.diseases)] + ["No Finding"]
    model = CIPL(class_names, backbone=args.backbone, prototype_dim=args.prototype_dim,
                 prototypes_per_class=args.prototypes_per_class)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    model.last_layer.requires_grad_(False)
    teacher = EmaTeacher(model, config.ema_decay)
    network = model
    if context.enabled:
        network = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    weights = loss_weights(config)

    generator = torch.Generator().manual_seed(1 + context.rank)
    images = torch.randn(2 * local_pairs, 3, args.image_size, args.image_size, generator=generator)
    images = images.to(device).contiguous(memory_format=memory_format)
    images_prime = images + 0.01 * torch.randn_like(images)
    targets = (torch.rand(2 * local_pairs, args.diseases + 1, generator=generator) < 0.3).float()
    targets[:, -1] = (targets[:, :-1].sum(1) == 0).float()
    targets = targets.to(device)

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            terms = paired_terms(network, teacher, images, images_prime, targets, config, model.prototype_class)
            loss = losses.combine_losses(terms, weights)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        teacher.update(model)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    result = dict(
        processes=context.world_size, device=str(device), backbone=args.backbone, image_size=args.image_size,
        global_pairs=args.pairs, amp=args.amp, channels_last=args.channels_last,
        images_per_second=2 * args.pairs * args.steps / seconds,
        peak_gpu_memory_gib=(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None),
    )
    destroy()
    return result if context.is_main else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--pairs", type=int, default=8, help="global pairs per step")
    parser.add_argument("--diseases", type=int, default=14)
    parser.add_argument("--prototype-dim", type=int, default=256)
    parser.add_argument("--prototypes-per-class", type=int, default=10)
    parser.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    result = measure(args)
    if result:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
