"""The training schedule as data, and the steps that run it.

``build_schedule`` turns a config into the paper's list of stages (warm-up epochs, paired epochs,
push, last-layer epochs). :class:`Trainer` runs any stage of that list, so ``main.py`` is one loop
over it and a resumed run simply starts further down the list.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import losses
from datasets import (
    ClassBalancedSampler, EvalTransform, PairedTwoViewDataset, SingleViewTransform, TransformedDataset,
    TwoViewTransform, unpack_pairs,
)
from model import CIPL, EmaTeacher, co_attention, disease_probabilities
from utils.metrics import per_class_auc
from utils.projection import push_prototypes

logger = logging.getLogger(__name__)

LOSS_TERMS = losses.LOSS_TERMS


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite."""


@dataclass(frozen=True)
class Stage:
    """One entry of the schedule. ``epoch`` is the training epoch it belongs to; last-layer stages
    also carry their position ``step`` within the round that follows a push."""

    kind: str  # "warmup" | "paired" | "push" | "last_layer"
    epoch: int
    step: int = 0

    @property
    def name(self) -> str:
        if self.kind == "last_layer":
            return f"last_layer (after push at epoch {self.epoch}, {self.step + 1})"
        return f"{self.kind} (epoch {self.epoch})"

    @property
    def trains(self) -> bool:
        return self.kind != "push"


def build_schedule(config) -> list[Stage]:
    """METHOD.md: warm-up epochs, then paired epochs; after each push epoch a push and
    ``last_layer_epochs`` last-layer-only epochs."""
    schedule: list[Stage] = []
    for epoch in range(config.epochs):
        schedule.append(Stage("warmup" if epoch < config.warmup_epochs else "paired", epoch))
        if epoch in config.push_epochs:
            schedule.append(Stage("push", epoch))
            schedule += [Stage("last_layer", epoch, step) for step in range(config.last_layer_epochs)]
    return schedule


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def loss_weights(config) -> losses.LossWeights:
    return losses.LossWeights(
        classification=config.weight_classification,
        cluster=config.weight_cluster,
        separation=config.weight_separation,
        separation_margin=config.separation_margin,
        cross_image=config.weight_cross_image,
        interpretation=config.weight_interpretation,
        prediction=config.weight_prediction,
    )


def prototype_terms(model: CIPL, output, targets, margin: float) -> dict:
    """L_cls, L_clst and the separation hinge for one batch of single images."""
    return dict(
        classification=losses.classification_loss(output.logits, targets),
        cluster=losses.cluster_loss(output.min_distances, targets, model.prototype_class),
        separation=losses.separation_loss(output.min_distances, targets, model.prototype_class, margin),
    )


def paired_terms(model: CIPL, teacher: EmaTeacher | None, views, views_prime, targets, config) -> dict:
    """All CIPL terms for a batch of 2B images: anchors [0:B], partners [B:2B] (METHOD.md)."""
    output = model(views)
    terms = prototype_terms(model, output, targets, config.separation_margin)
    if config.cross_image:
        half = views.shape[0] // 2
        b_at_a, a_at_b = co_attention(output.features[:half], output.features[half:])
        cross = model.classify_features(torch.cat([b_at_a, a_at_b]))
        terms["cross_image"] = losses.cross_image_loss(
            cross.logits[:half], cross.logits[half:], targets[:half], targets[half:]
        )
    if teacher is not None and config.uses_alignment:
        teacher_output = teacher(views_prime)
        if config.interpretation_alignment:
            terms["interpretation"] = losses.interpretation_alignment_loss(output.similarity_maps, teacher_output.similarity_maps)
        if config.prediction_alignment:
            terms["prediction"] = losses.prediction_alignment_loss(output.logits, teacher_output.logits)
    return terms


class Trainer:
    """Owns the model, teacher, optimizers and data of one run and executes schedule stages."""

    def __init__(self, config, model: CIPL, splits, device: torch.device, progress: bool = True):
        self.config = config
        self.model = model.to(device)
        self.splits = splits
        self.device = device
        self.progress = progress
        self.teacher: EmaTeacher | None = None
        self.weights = loss_weights(config)
        self.joint_optimizer = torch.optim.Adam(
            [
                dict(params=model.backbone_parameters(), lr=config.lr_backbone, name="backbone"),
                dict(params=model.add_on_parameters(), lr=config.lr_add_on, name="add_on"),
                dict(params=[model.prototypes], lr=config.lr_prototypes, name="prototypes"),
            ],
            weight_decay=config.weight_decay,
        )
        self.last_layer_optimizer = torch.optim.Adam(
            [dict(params=model.last_layer.parameters(), lr=config.lr_last_layer, name="last_layer")], weight_decay=0.0
        )
        self.joint_scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.joint_optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma
        )
        self.provenance: list[dict] = []
        train = splits.train
        self.num_samples = config.samples_per_epoch or len(train)
        self.eval_transform = EvalTransform(config.image_size)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return dict(
            model=self.model.state_dict(),
            teacher=self.teacher.state_dict() if self.teacher is not None else None,
            optimizers=dict(joint=self.joint_optimizer.state_dict(), last_layer=self.last_layer_optimizer.state_dict()),
            schedulers=dict(joint=self.joint_scheduler.state_dict()),
            prototype_provenance=self.provenance,
            model_description=self.model.description(),
            class_names=self.model.class_names,
        )

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if state.get("teacher") is not None:
            self.teacher = EmaTeacher(self.model, self.config.ema_decay).to(self.device)
            self.teacher.load_state_dict(state["teacher"])
        self.joint_optimizer.load_state_dict(state["optimizers"]["joint"])
        self.last_layer_optimizer.load_state_dict(state["optimizers"]["last_layer"])
        self.joint_scheduler.load_state_dict(state["schedulers"]["joint"])
        self.provenance = state.get("prototype_provenance", [])

    def learning_rates(self) -> dict:
        rates = {f"lr_{group['name']}": group["lr"] for group in self.joint_optimizer.param_groups}
        rates["lr_last_layer"] = self.last_layer_optimizer.param_groups[0]["lr"]
        return rates

    # -- stages --------------------------------------------------------------------------------
    def run_stage(self, stage: Stage, stage_index: int) -> dict:
        """Run one schedule stage; returns the mean of each loss term (empty for push)."""
        # Every stage is seeded from (seed, stage index): its randomness does not depend on what
        # ran before in this process, which makes a resumed run identical to an uninterrupted one.
        seed_everything(self.config.seed * 1_000_003 + stage_index)
        if stage.kind == "push":
            self.push()
            return {}
        if stage.kind in ("paired", "last_layer") and self.teacher is None and self.config.uses_alignment:
            logger.info("creating the EMA teacher from the student")
            self.teacher = EmaTeacher(self.model, self.config.ema_decay).to(self.device)
        result = self.train_epoch(stage, stage_index)
        if stage.kind in ("warmup", "paired"):
            self.joint_scheduler.step()
        return result

    def _set_trainable(self, kind: str) -> None:
        last_only = kind == "last_layer"
        for parameter in self.model.parameters():
            parameter.requires_grad_(not last_only)
        self.model.last_layer.weight.requires_grad_(last_only)
        # The last-layer stage keeps the pushed features fixed: BatchNorm in eval mode, so its
        # running statistics cannot drift away from the patches the prototypes were copied from.
        self.model.train(not last_only)

    def _loader(self, stage: Stage, stage_index: int) -> DataLoader:
        paired = stage.kind != "warmup"
        config = self.config
        sampler = ClassBalancedSampler(
            self.splits.train.targets,
            num_samples=self.num_samples,
            cap=config.class_weight_cap,
            no_finding_multiplier=config.no_finding_weight_paired if paired else config.no_finding_weight_warmup,
            paired=paired,
            seed=config.seed,
            **self.shard_arguments(),
        )
        sampler.set_epoch(stage_index)
        if paired:
            dataset = PairedTwoViewDataset(self.splits.train, TwoViewTransform(config))
            batch_size = config.batch_size
        else:
            dataset = TransformedDataset(self.splits.train, SingleViewTransform(config))
            batch_size = 2 * config.batch_size  # as many images per step as a paired step
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + stage_index)
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=config.num_workers,
            drop_last=len(sampler) >= batch_size, generator=generator,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )

    def shard_arguments(self) -> dict:
        return {}

    def train_epoch(self, stage: Stage, stage_index: int) -> dict:
        self._set_trainable(stage.kind)
        optimizer = self.last_layer_optimizer if stage.kind == "last_layer" else self.joint_optimizer
        loader = self._loader(stage, stage_index)
        totals = {name: 0.0 for name in LOSS_TERMS + ("loss",)}
        counts = {name: 0 for name in totals}
        bar = tqdm(loader, desc=stage.name, leave=False, disable=not self.progress)
        for step, batch in enumerate(bar):
            if stage.kind == "warmup":
                images = batch["image"].to(self.device, non_blocking=True)
                targets = batch["target"].to(self.device, non_blocking=True)
                terms = prototype_terms(self.model, self.model(images), targets, self.config.separation_margin)
            else:
                views, views_prime, targets, _ = (t.to(self.device, non_blocking=True) for t in unpack_pairs(batch))
                terms = paired_terms(self.model, self.teacher, views, views_prime, targets, self.config)
            loss = losses.combine_losses(terms, self.weights)
            values = {name: float(value.detach()) for name, value in terms.items()}
            values["loss"] = float(loss.detach())
            bad = {name: value for name, value in values.items() if not math.isfinite(value)}
            if bad:
                raise TrainingDiverged(
                    f"non-finite loss in stage {stage.kind}, epoch {stage.epoch}, step {step}: "
                    + ", ".join(f"{name}={value}" for name, value in bad.items())
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if stage.kind == "last_layer":
                self.model.constrain_last_layer()
            if self.teacher is not None and stage.kind != "warmup":
                self.teacher.update(self.model)
            for name, value in values.items():
                totals[name] += value
                counts[name] += 1
            bar.set_postfix(loss=f"{values['loss']:.4f}")
        return {name: totals[name] / counts[name] for name in totals if counts[name]}

    def push(self) -> None:
        dataset = TransformedDataset(self.splits.train, self.eval_transform)
        self.provenance = push_prototypes(
            self.model, dataset, self.device, batch_size=self.config.eval_batch_size,
            num_workers=self.config.num_workers, progress=self.progress, image_ids=self.splits.train.image_ids,
        )

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, dataset) -> tuple[np.ndarray, np.ndarray]:
        """Disease probabilities [N, C] and disease targets [N, C] for a base dataset."""
        return predict(self.model, dataset, self.device, self.config.image_size, self.config.eval_batch_size,
                       self.config.num_workers, self.progress)

    def evaluate(self, dataset) -> dict:
        probabilities, targets = self.predict(dataset)
        return per_class_auc(targets, probabilities, dataset.disease_names)


@torch.no_grad()
def predict(model: CIPL, dataset, device, image_size: int, batch_size: int, num_workers: int = 0, progress: bool = True):
    was_training = model.training
    model.eval()
    loader = DataLoader(
        TransformedDataset(dataset, EvalTransform(image_size)),
        batch_size=batch_size, shuffle=False, num_workers=num_workers,
    )
    probabilities = []
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not progress):
        probabilities.append(disease_probabilities(model(batch["image"].to(device)).logits).float().cpu())
    model.train(was_training)
    return torch.cat(probabilities).numpy(), dataset.targets[:, :-1]
