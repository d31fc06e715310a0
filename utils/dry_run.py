"""``python main.py ... --dry-run``: the plan of a run, before it spends a GPU-day.

Everything here only describes: the resolved configuration, the splits with their per-class counts,
the class-balanced sampler's weights, the stage plan with the learning rates each stage trains with,
the model's size and the optimizer steps per epoch. main.py prints the text :func:`describe` returns
after the pre-flight checks; nothing is written (no run directory, no image cache, no weights).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from datasets import class_sampling_weights
from utils.projection import cell_cap_for
from utils.training import build_schedule


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps of one epoch, as Trainer's loader draws them: each process takes
    ceil(num_samples / world_size) samples and drops the incomplete last batch unless there is
    only one batch."""
    per_process = math.ceil(num_samples / world_size)
    return per_process // batch_size if per_process >= batch_size else (1 if per_process else 0)


@dataclass(frozen=True)
class PlannedStage:
    index: int
    name: str
    kind: str
    epoch: int
    learning_rates: dict  # lr_backbone, lr_add_on, lr_prototypes, lr_last_layer: what the stage trains with
    steps: int  # optimizer steps (0 for a push)
    trains: str


def stage_plan(config, num_train: int, world_size: int = 1) -> list[PlannedStage]:
    """Every stage of ``build_schedule(config)`` with its learning rates and optimizer steps.

    The rates come from the same MultiStepLR the Trainer uses, stepped after each warm-up or paired
    epoch; a stage's rates are those before its own step, i.e. the ones it trains with."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(probe, milestones=list(config.lr_milestones), gamma=config.lr_gamma)
    local_batch = config.batch_size // world_size
    samples = config.samples_per_epoch or num_train
    teacher = " (the EMA teacher follows)" if config.uses_alignment else ""
    trains = dict(
        warmup="backbone, top layer, add-on, prototypes"
               + (", local decoder (L_rec, not in the paper)" if config.weight_local_reconstruction > 0 else "")
               + "; single images",
        paired="backbone, top layer, add-on, prototypes; pairs, two views" + teacher,
        push="nothing: each prototype becomes its nearest training patch"
             + (f" (at most {cell_cap_for(config.push_max_cell_share, config.prototypes_per_class)} "
                f"of a class's {config.prototypes_per_class} prototypes per cell: the cell cap, not in the paper)"
                if config.push_max_cell_share < 1 else ""),
        last_layer="last layer only" + teacher,
    )
    plan = []
    for index, stage in enumerate(build_schedule(config)):
        factor = probe.param_groups[0]["lr"]
        rates = dict(lr_backbone=config.lr_backbone * factor, lr_add_on=config.lr_add_on * factor,
                     lr_prototypes=config.lr_prototypes * factor, lr_last_layer=config.lr_last_layer)
        if stage.kind == "push":
            steps = 0
        else:
            steps = steps_per_epoch(samples, 2 * local_batch if stage.kind == "warmup" else local_batch, world_size)
        plan.append(PlannedStage(index, stage.name, stage.kind, stage.epoch, rates, steps, trains[stage.kind]))
        if stage.kind in ("warmup", "paired"):
            probe.step()  # no gradients: only so the scheduler does not warn about the order
            scheduler.step()
    return plan


def _runs(plan: list[PlannedStage], start_stage: int) -> list[list[PlannedStage]]:
    """Consecutive stages that differ only in their epoch, grouped (one table row each)."""
    groups: list[list[PlannedStage]] = []
    for stage in plan:
        key = (stage.kind, stage.learning_rates, stage.steps, stage.index < start_stage)
        previous = groups[-1][-1] if groups else None
        if previous is not None and (previous.kind, previous.learning_rates, previous.steps,
                                     previous.index < start_stage) == key and stage.kind != "push":
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


def _steps(count: int) -> str:
    return f"{count} step{'' if count == 1 else 's'}"


def parameter_counts(model) -> dict[str, int]:
    counts = dict(
        backbone_and_top_layer=sum(p.numel() for p in model.backbone_parameters()),
        add_on=sum(p.numel() for p in model.add_on_parameters()),
        prototypes=model.prototypes.numel(),
        last_layer=model.last_layer.weight.numel(),
    )
    counts["total"] = sum(counts.values())
    return counts


def _table(header: list[str], rows: list[list], left: frozenset[int] = frozenset({0})) -> list[str]:
    """Plain-text columns; the columns in ``left`` are left-aligned, numbers right-aligned."""
    cells = [[str(value) for value in row] for row in [header, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]

    def line(row):
        return "  ".join(value.ljust(width) if column in left else value.rjust(width)
                         for column, (value, width) in enumerate(zip(row, widths))).rstrip()

    return [line(cells[0]), *(line(row) for row in cells[1:])]


def describe(config, splits, model, run_dir, world_size: int = 1, start_stage: int = 0) -> str:
    """The whole plan as text. ``start_stage``: the stage a resumed run would continue at."""
    lines = [f"Dry run: nothing was written. Without --dry-run this run would write to {run_dir}/", ""]
    resolved = dict(config.to_dict(), out_dir=str(run_dir))
    lines += ["Configuration (config.json):", json.dumps(resolved, indent=2), ""]

    named = [("train", splits.train), ("val", splits.val), ("test", splits.test), *(splits.extra_tests or {}).items()]
    lines.append("Splits: " + ", ".join(f"{name} {len(dataset)} images" for name, dataset in named))
    train_targets = np.asarray(splits.train.targets)
    warmup = class_sampling_weights(train_targets, config.class_weight_cap, config.no_finding_weight_warmup)
    paired = class_sampling_weights(train_targets, config.class_weight_cap, config.no_finding_weight_paired)
    rows = []
    for column, name in enumerate(splits.class_names):
        counts = [int(np.asarray(dataset.targets)[:, column].sum()) for _, dataset in named]
        rows.append([name, *counts, f"{warmup[column]:.3g}", f"{paired[column]:.3g}"])
    lines += [
        "Images per class, and the sampler's class weights w_c = (positive labels) / (images of the class), "
        f"capped at {config.class_weight_cap:g}, No Finding x{config.no_finding_weight_warmup:g} in warm-up, "
        f"x{config.no_finding_weight_paired:g} in paired and last-layer epochs:",
        *_table(["class", *(name for name, _ in named), "weight warm-up", "weight paired"], rows), "",
    ]

    plan = stage_plan(config, len(splits.train), world_size)
    samples = config.samples_per_epoch or len(splits.train)
    warmup_steps = next((stage.steps for stage in plan if stage.kind == "warmup"), 0)
    paired_steps = next((stage.steps for stage in plan if stage.kind in ("paired", "last_layer")), 0)
    pushes = sum(stage.kind == "push" for stage in plan)
    processes = f" on {world_size} processes" if world_size > 1 else ""
    lines += [
        f"Schedule: {len(plan)} stages over {config.epochs} epochs, {pushes} pushes; {sum(s.steps for s in plan)} "
        f"optimizer steps in all{processes}. An epoch draws {samples} anchors "
        f"({'--samples-per-epoch' if config.samples_per_epoch else 'one per training image'}): "
        f"{_steps(warmup_steps)} per warm-up epoch ({2 * config.batch_size} images each), {_steps(paired_steps)} per "
        f"paired or last-layer epoch ({config.batch_size} pairs each).",
    ]
    rows = []
    for group in _runs(plan, start_stage):
        first, last = group[0], group[-1]
        if first.kind == "last_layer":
            epochs = f"{len(group)} after the push at {first.epoch}"
        else:
            epochs = str(first.epoch) if first.epoch == last.epoch else f"{first.epoch}-{last.epoch}"
        rows.append([
            str(first.index) if len(group) == 1 else f"{first.index}-{last.index}",
            ("(done) " if first.index < start_stage else "") + first.kind.replace("_", " "), epochs,
            *(f"{first.learning_rates[key]:.3g}" for key in ("lr_backbone", "lr_add_on", "lr_prototypes", "lr_last_layer")),
            first.steps if first.kind != "push" else "-", first.trains,
        ])
    lines += _table(["stages", "stage", "epochs", "lr backbone", "lr add-on", "lr prototypes", "lr last layer",
                     "steps/epoch", "trains"], rows, left=frozenset({0, 1, 2, 8}))
    lines.append("")

    counts = parameter_counts(model)
    if not config.pretrained:
        weights = "trained from scratch"
    elif config.pretrained_path:
        weights = f"ImageNet weights from {config.pretrained_path}"
    else:
        weights = "ImageNet weights, downloaded from torchvision on first use"
    lines += [
        f"Model: {config.backbone} backbone ({weights}); {model.num_classes} classes x {model.prototypes_per_class} "
        f"prototypes of dimension {model.prototype_dim} = {model.num_prototypes} prototypes; {config.image_size} px input.",
        f"Parameters: {counts['total']:,} = backbone and top layer {counts['backbone_and_top_layer']:,} + add-on "
        f"{counts['add_on']:,} + prototypes {counts['prototypes']:,} + last layer {counts['last_layer']:,}.",
    ]
    return "\n".join(lines)
