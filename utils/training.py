"""The training schedule as data, and the steps that run it.

``build_schedule`` turns a config into the paper's list of stages (warm-up epochs, paired epochs,
push, last-layer epochs). :class:`Trainer` runs any stage of that list, so ``main.py`` is one loop
over it and a resumed run simply starts further down the list.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import losses
from datasets import (
    ClassBalancedSampler, EvalTransform, PairedTwoViewDataset, SingleViewTransform, TransformedDataset,
    TwoViewTransform, unpack_pairs,
)
from model import CIPL, EmaTeacher, disease_probabilities
from utils.checkpoint import load_model_weights
from utils.distributed import all_gather_objects, all_reduce_sum, broadcast_tensor, current_context, shard_indices
from utils.metrics import per_class_auc
from utils.projection import push_prototypes
from utils.prototype_quality import format_quality, prototype_grounding, quality_report, warn_if_collapsed

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
    outside = [epoch for epoch in config.push_epochs if not 0 <= epoch < config.epochs]
    if outside:
        raise ValueError(f"--push-epochs {outside} outside the {config.epochs} epochs (0..{config.epochs - 1})")
    if config.warmup_epochs > config.epochs:
        raise ValueError(f"--warmup-epochs {config.warmup_epochs} exceeds --epochs {config.epochs}")
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


def resolve_device(name: str, context=None) -> torch.device:
    """'auto' -> this process's GPU (its LOCAL_RANK under torchrun) if there is one, else the CPU."""
    local_rank = context.local_rank if context is not None else 0
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name}: not a device name ({error})") from error
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: no such GPU here ({torch.cuda.device_count()} visible); use --device cpu")
    return device


def loss_weights(config) -> losses.LossWeights:
    return losses.LossWeights(
        classification=config.weight_classification,
        cluster=config.weight_cluster,
        separation=config.weight_separation,
        separation_margin=config.separation_margin,
        cross_image=config.weight_cross_image,
        interpretation=config.weight_interpretation,
        prediction=config.weight_prediction,
        local_reconstruction=config.weight_local_reconstruction,
    )


# The local decoder's initial weights come from a generator of their own: switching the term on leaves
# every other initial weight and random draw of a run as they were without it.
LOCAL_DECODER_SEED = 20261127


def build_local_decoder(model: CIPL) -> torch.nn.Conv2d:
    """The warm-up's local decoder (settings.weight_local_reconstruction): a 1 x 1 convolution from a
    cell's D features to the stride x stride grey pixels at its centre; weights uniform in
    +-1/sqrt(D), as PyTorch's own default draws them, and biases 0."""
    step = int(model.cell_grid(1).step)
    decoder = torch.nn.utils.skip_init(torch.nn.Conv2d, model.prototype_dim, step * step, kernel_size=1)
    generator = torch.Generator().manual_seed(LOCAL_DECODER_SEED)
    bound = 1.0 / model.prototype_dim ** 0.5
    with torch.no_grad():
        decoder.weight.copy_((torch.rand(decoder.weight.shape, generator=generator) * 2 - 1) * bound)
        decoder.bias.zero_()
    return decoder


class ReconstructingNetwork(torch.nn.Module):
    """The model and the local decoder as one module for warm-up steps, so that DistributedDataParallel
    and torch.compile see both: images -> (the model's output, the decoder's output on its features)."""

    def __init__(self, model: CIPL, decoder: torch.nn.Module):
        super().__init__()
        self.model = model
        self.decoder = decoder

    def forward(self, images: torch.Tensor):
        output = self.model(images)
        return output, self.decoder(output.features)


def prototype_terms(prototype_class, output, targets, margin: float) -> dict:
    """L_cls, L_clst and the separation hinge for one batch of single images."""
    return dict(
        classification=losses.classification_loss(output.logits, targets),
        cluster=losses.cluster_loss(output.min_distances, targets, prototype_class),
        separation=losses.separation_loss(output.min_distances, targets, prototype_class, margin),
    )


def paired_terms(model, teacher: EmaTeacher | None, views, views_prime, targets, config, prototype_class) -> dict:
    """All CIPL terms for a batch of 2B images: anchors [0:B], partners [B:2B] (METHOD.md).

    ``model`` is the CIPL network or its DistributedDataParallel wrapper."""
    output = model(views, co_attend=config.cross_image)
    teacher_output = teacher(views_prime) if teacher is not None and config.uses_alignment else None
    return paired_terms_of(output, teacher_output, targets, config, prototype_class)


def paired_terms_of(output, teacher_output, targets, config, prototype_class) -> dict:
    """The CIPL terms from the student's output (with co-attended logits when config.cross_image) and
    the teacher's output on the second views (None: no alignment terms)."""
    terms = prototype_terms(prototype_class, output, targets, config.separation_margin)
    if config.cross_image:
        half = targets.shape[0] // 2
        terms["cross_image"] = losses.cross_image_loss(
            output.cross_logits[:half], output.cross_logits[half:], targets[:half], targets[half:]
        )
    if teacher_output is not None:
        if config.interpretation_alignment:
            terms["interpretation"] = losses.interpretation_alignment_loss(output.similarity_maps, teacher_output.similarity_maps)
        if config.prediction_alignment:
            terms["prediction"] = losses.prediction_alignment_loss(output.logits, teacher_output.logits)
    return terms


class Trainer:
    """Owns the model, teacher, optimizers and data of one run and executes schedule stages."""

    def __init__(self, config, model: CIPL, splits, device: torch.device, progress: bool = True):
        self.config = config
        self.context = current_context()
        if config.sync_batchnorm and self.context.enabled:
            if device.type != "cuda":
                raise ValueError("--sync-batchnorm needs GPUs (NCCL); on CPUs leave it off")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)
        self.splits = splits
        self.device = device
        self.progress = progress and self.context.is_main
        if config.amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"--amp must be off, bf16 or fp16, not {config.amp!r}")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
        if config.batch_size % self.context.world_size:
            raise ValueError(f"--batch-size {config.batch_size} is not divisible by the {self.context.world_size} processes")
        self.local_batch_size = config.batch_size // self.context.world_size
        self._networks: dict[str, torch.nn.Module] = {}
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
        # Not in the paper: the warm-up's local reconstruction term and the decoder it trains, stepped
        # with the add-on's learning rate (it gets no gradient outside warm-up).
        self.local_decoder = None
        if config.weight_local_reconstruction > 0:
            self.local_decoder = build_local_decoder(model).to(device)
            self.joint_optimizer.add_param_group(
                dict(params=list(self.local_decoder.parameters()), lr=config.lr_add_on, name="local_decoder")
            )
        self.joint_scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.joint_optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma
        )
        self.provenance: list[dict] = []
        self.push_quality: dict | None = None  # prototype quality after the latest push (rank 0)
        # TensorBoard's step axis: optimizer steps so far, plus one per push, so that every stage
        # ends on a step of its own (utils/tensorboard_log.py). Saved in checkpoints.
        self.global_step = 0
        self.board = None  # a utils.tensorboard_log.TensorBoardLog; main.py gives rank 0 one
        train = splits.train
        self.num_samples = config.samples_per_epoch or len(train)
        self.eval_transform = EvalTransform(config.image_size)
        self.cell_grid = model.cell_grid(config.image_size)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return dict(
            model=self.model.state_dict(),
            teacher=self.teacher.state_dict() if self.teacher is not None else None,
            local_decoder=self.local_decoder.state_dict() if self.local_decoder is not None else None,
            optimizers=dict(joint=self.joint_optimizer.state_dict(), last_layer=self.last_layer_optimizer.state_dict()),
            schedulers=dict(joint=self.joint_scheduler.state_dict()),
            grad_scaler=self.scaler.state_dict(),
            prototype_provenance=self.provenance,
            model_description=self.model.description(),
            class_names=self.model.class_names,
            global_step=self.global_step,
        )

    def load_state_dict(self, state: dict) -> None:
        load_model_weights(self.model, state)
        if state.get("teacher") is not None:
            self.teacher = EmaTeacher(self.model, self.config.ema_decay).to(self.device)
            self.teacher.load_state_dict(state["teacher"])
        if self.local_decoder is not None:
            self.local_decoder.load_state_dict(state["local_decoder"])
        self.joint_optimizer.load_state_dict(state["optimizers"]["joint"])
        self.last_layer_optimizer.load_state_dict(state["optimizers"]["last_layer"])
        self.joint_scheduler.load_state_dict(state["schedulers"]["joint"])
        if state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.provenance = state.get("prototype_provenance", [])
        self.global_step = state.get("global_step", 0)

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
            self.global_step += 1
            return {}
        if stage.kind in ("paired", "last_layer") and self.teacher is None and self.config.uses_alignment:
            logger.info("creating the EMA teacher from the student")
            self.teacher = EmaTeacher(self.model, self.config.ema_decay).to(self.device)
        if stage.kind in ("warmup", "paired") and self.provenance:
            # Joint training moves the prototypes off their pushed patches: the model is no longer
            # grounded (and not eligible as an interpretable best model) until the next push.
            self.model.forget_provenance()
            self.provenance = []
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
            rank=self.context.rank,
            num_replicas=self.context.world_size,
        )
        sampler.set_epoch(stage_index)
        if paired:
            dataset = PairedTwoViewDataset(self.splits.train, TwoViewTransform(config))
            batch_size = self.local_batch_size
        else:
            dataset = TransformedDataset(self.splits.train, SingleViewTransform(config))
            batch_size = 2 * self.local_batch_size  # as many images per step as a paired step
        # Worker seeds differ per rank, so ranks augment differently; each is still reproducible.
        generator = torch.Generator().manual_seed((config.seed * 1_000_003 + stage_index) * 1009 + self.context.rank)
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=config.num_workers,
            drop_last=len(sampler) >= batch_size, generator=generator,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )

    def network(self, kind: str) -> torch.nn.Module:
        """What the training step calls: the model, wrapped in DistributedDataParallel under torchrun
        and compiled with --compile. One wrapper per set of trainable parameters, because DDP fixes
        that set when it is built."""
        key = "last_layer" if kind == "last_layer" else "joint"
        if kind == "warmup" and self.local_decoder is not None:
            key = "warmup"
        if key not in self._networks:
            network: torch.nn.Module = self.model
            if key == "warmup":
                network = ReconstructingNetwork(self.model, self.local_decoder)
            if self.context.enabled:
                device_ids = [self.device.index] if self.device.type == "cuda" else None
                network = torch.nn.parallel.DistributedDataParallel(network, device_ids=device_ids)
            if self.config.compile:
                network = torch.compile(network)
            self._networks[key] = network
        return self._networks[key]

    def train_epoch(self, stage: Stage, stage_index: int) -> dict:
        self._set_trainable(stage.kind)
        network = self.network(stage.kind)
        optimizer = self.last_layer_optimizer if stage.kind == "last_layer" else self.joint_optimizer
        loader = self._loader(stage, stage_index)
        prototype_class = self.model.prototype_class
        totals = torch.zeros(len(LOSS_TERMS) + 1, dtype=torch.float64)
        counts = torch.zeros_like(totals)
        window, window_counts = torch.zeros_like(totals), torch.zeros_like(totals)  # since the last TensorBoard point
        bar = tqdm(loader, desc=stage.name, leave=False, disable=not self.progress)
        for step, batch in enumerate(bar):
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                if stage.kind == "warmup":
                    images = self._to_device(batch["image"])
                    targets = batch["target"].to(self.device, non_blocking=True)
                    if self.local_decoder is None:
                        output = network(images)
                    else:
                        output, reconstruction = network(images)
                    terms = prototype_terms(prototype_class, output, targets, self.config.separation_margin)
                    if self.local_decoder is not None:
                        terms["local_reconstruction"] = losses.local_reconstruction_loss(
                            reconstruction, images, self.cell_grid.first, int(self.cell_grid.step)
                        )
                else:
                    views, views_prime, targets, _ = unpack_pairs(batch)
                    views, views_prime = self._to_device(views), self._to_device(views_prime)
                    targets = targets.to(self.device, non_blocking=True)
                    terms = paired_terms(network, self.teacher, views, views_prime, targets, self.config, prototype_class)
                loss = losses.combine_losses(terms, self.weights)
            values = torch.stack([terms[name].detach().double().cpu() if name in terms else torch.zeros((), dtype=torch.float64)
                                  for name in LOSS_TERMS] + [loss.detach().double().cpu()])
            present = torch.tensor([name in terms for name in LOSS_TERMS] + [True], dtype=torch.float64)
            self._check_finite(values, present, stage, step)
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
            if stage.kind == "last_layer":
                self.model.constrain_last_layer()
            if self.teacher is not None and stage.kind != "warmup":
                self.teacher.update(self.model)
            totals += values * present
            counts += present
            window += values * present
            window_counts += present
            self.global_step += 1
            if self.board is not None and (step + 1) % self.config.log_every == 0:
                self.board.log_scalars("train", _means(window, window_counts), self.global_step)
                window.zero_()
                window_counts.zero_()
            bar.set_postfix(loss=f"{float(values[-1]):.4f}")
        if self.board is not None and window_counts[-1] > 0:  # the stage's last, shorter window
            self.board.log_scalars("train", _means(window, window_counts), self.global_step)
        # DDP broadcasts buffers only at the start of a forward: after the last step each rank holds
        # BatchNorm statistics of its own batch. Take rank 0's everywhere, student and teacher alike.
        for buffer in self.model.buffers():
            broadcast_tensor(buffer)
        if self.teacher is not None:
            for buffer in self.teacher.module.buffers():
                broadcast_tensor(buffer)
        # Average over all ranks' steps, so the logged losses describe the whole epoch.
        summed = all_reduce_sum(torch.cat([totals, counts]).to(self.device)).cpu()
        return _means(summed[: len(totals)], summed[len(totals):])

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def _check_finite(self, values: torch.Tensor, present: torch.Tensor, stage: Stage, step: int) -> None:
        """Stop on a NaN/inf loss on any rank (summed across ranks so every rank stops together)."""
        local_bad = (~torch.isfinite(values)) & (present > 0)
        any_bad = all_reduce_sum(local_bad.double().to(self.device)).cpu() > 0
        if any_bad.any():
            names = LOSS_TERMS + ("loss",)
            bad = [f"{names[i]}={float(values[i])}" for i in range(len(names)) if any_bad[i]]
            raise TrainingDiverged(f"non-finite loss in stage {stage.kind}, epoch {stage.epoch}, step {step}: " + ", ".join(bad))

    def push(self) -> None:
        dataset = TransformedDataset(self.splits.train, self.eval_transform)
        self.provenance = push_prototypes(
            self.model, dataset, self.device, batch_size=self.config.eval_batch_size,
            num_workers=self.config.num_workers, progress=self.progress, image_ids=self.splits.train.image_ids,
            max_cell_share=self.config.push_max_cell_share,
        )
        if self.context.is_main:
            # Collapse is visible the moment the prototypes are grounded: warn now, not after the run.
            self.push_quality = push_quality(self.model, self.splits.train, self.config, self.device)
        if self.teacher is not None:
            # The teacher is an average of past students; push replaces the prototypes outright, so
            # the teacher takes the pushed ones too, or the alignment terms would compare similarity
            # maps of two different prototype sets until the average caught up.
            with torch.no_grad():
                self.teacher.module.prototypes.copy_(self.model.prototypes)
                for name in ("prototype_source_index", "prototype_source_location", "prototype_source_distance"):
                    getattr(self.teacher.module, name).copy_(getattr(self.model, name))

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, dataset, with_scores: bool = False) -> tuple[np.ndarray, ...]:
        """Disease probabilities [N, C] and disease targets [N, C] for a base dataset (and with
        ``with_scores`` the prototype scores [N, P])."""
        return predict(self.model, dataset, self.device, self.config.image_size, self.config.eval_batch_size,
                       self.config.num_workers, self.progress, self.amp_dtype, with_scores)

    def evaluate(self, dataset) -> dict:
        probabilities, targets = self.predict(dataset)
        return per_class_auc(targets, probabilities, dataset.disease_names)


def push_quality(model: CIPL, train, config, device) -> dict:
    """Right after a push: warn about collapsed classes, and log diversity and grounding (selectivity
    needs held-out images; the final report adds it)."""
    grounding = prototype_grounding(model, train, config.image_size, device, config.eval_batch_size)
    diversity = warn_if_collapsed(model, train.image_ids, grounding)
    report = quality_report(model, diversity, grounding, selectivity=None)
    logger.info("prototype quality after push:\n%s", format_quality(report))
    return report


def _means(totals: torch.Tensor, counts: torch.Tensor) -> dict:
    """Sums and counts over LOSS_TERMS + ("loss",) -> {name: mean} for the names that occurred."""
    names = LOSS_TERMS + ("loss",)
    return {name: float(totals[i] / counts[i]) for i, name in enumerate(names) if counts[i] > 0}


@torch.no_grad()
def predict(model: CIPL, dataset, device, image_size: int, batch_size: int, num_workers: int = 0,
            progress: bool = True, amp_dtype: torch.dtype | None = None, with_scores: bool = False):
    """Disease probabilities [N, C] (in dataset order) and disease targets [N, C]; with ``with_scores``
    also every prototype's score max_hw exp(-d/D) on every image [N, P] (for prototype selectivity).

    Under torchrun every rank predicts its own share of the images and the shares are gathered, so
    every rank returns the full, identical arrays."""
    was_training = model.training
    model.eval()
    indices = shard_indices(len(dataset))
    loader = DataLoader(
        Subset(TransformedDataset(dataset, EvalTransform(image_size)), indices),
        batch_size=batch_size, shuffle=False, num_workers=num_workers,
    )
    width = dataset.num_classes - 1 + (model.num_prototypes if with_scores else 0)
    rows = [torch.zeros(0, width)]
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not progress):
        with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(batch["image"].to(device))
        row = disease_probabilities(output.logits.float())
        if with_scores:
            row = torch.cat([row, torch.exp(-output.min_distances.float() / model.prototype_dim)], dim=1)
        rows.append(row.cpu())
    model.train(was_training)
    local = torch.cat(rows)
    gathered = all_gather_objects((indices, local))
    result = torch.zeros(len(dataset), width)
    for shard, values in gathered:
        result[shard] = values
    probabilities = result[:, : dataset.num_classes - 1].numpy()
    if with_scores:
        return probabilities, dataset.targets[:, :-1], result[:, dataset.num_classes - 1 :].numpy()
    return probabilities, dataset.targets[:, :-1]
