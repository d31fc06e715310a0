"""Every benchmark of the project in one report: ratios measured side by side in one run.

    python bench/run.py             # everything this machine can run
    python bench/run.py --quick     # fewer steps (noisier)

Sections: paired CIPL step vs plain classifier, co-attention memory vs naive, push vs one inference
pass, cached vs raw image loader, 2-process (torchrun, gloo) vs 1-process CPU throughput and, when a
GPU is present, DenseNet-121 at 512 px with bf16 + channels-last against fp32.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def run(command: list[str]) -> str:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        return f"FAILED ({' '.join(command[1:3])}): {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}"
    return result.stdout.strip()


def throughput(extra: list[str], processes: int = 1) -> dict:
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "bench/throughput.py", *extra]
    else:
        command = [sys.executable, "bench/throughput.py", *extra]
    output = run(command)
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(output)


def section(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    steps = ["--steps", "3"] if args.quick else []
    print(f"machine: {platform.node()} | {platform.processor() or platform.machine()} | {torch.get_num_threads()} CPU threads | "
          f"torch {torch.__version__} | GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")

    section("training step and co-attention memory (bench/train_step.py)")
    print(run([sys.executable, "bench/train_step.py", *steps]))

    section("push vs one inference pass (bench/push.py)")
    print(run([sys.executable, "bench/push.py", *(["--repeats", "2"] if args.quick else [])]))

    section("image loader: cache vs original files (bench/loader.py)")
    print(run([sys.executable, "bench/loader.py", *(["--images", "100"] if args.quick else [])]))

    section("DDP on the CPU: 2 processes (torchrun, gloo) vs 1 process, same global batch")
    cpu = ["--backbone", "resnet18", "--image-size", "96", "--pairs", "8", *(["--steps", "3"] if args.quick else ["--steps", "6"])]
    one = throughput(cpu, processes=1)
    two = throughput(cpu, processes=2)
    print(f"1 process {one['images_per_second']:.1f} img/s | 2 processes {two['images_per_second']:.1f} img/s | "
          f"ratio {two['images_per_second'] / one['images_per_second']:.2f}x "
          f"(the machine has {torch.get_num_threads()} threads in all: processes share the same cores)")

    section("GPU: DenseNet-121 at 512 px, bf16 + channels-last vs fp32")
    if torch.cuda.is_available():
        gpu = ["--device", "cuda", "--backbone", "densenet121", "--image-size", "512", "--pairs", "12", "--prototype-dim", "256",
               "--prototypes-per-class", "50", "--steps", "10", "--warmup", "3"]
        fp32 = throughput(gpu)
        fast = throughput([*gpu, "--amp", "bf16", "--channels-last"])
        print(f"fp32 {fp32['images_per_second']:.1f} img/s ({fp32['peak_gpu_memory_gib']:.1f} GiB) | bf16 + channels-last "
              f"{fast['images_per_second']:.1f} img/s ({fast['peak_gpu_memory_gib']:.1f} GiB) | "
              f"speed-up {fast['images_per_second'] / fp32['images_per_second']:.2f}x")
    else:
        print("skipped: no GPU on this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
