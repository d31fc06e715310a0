"""Configuration: one dataclass, named presets, and a command line generated from it.

Every knob of a run lives in :class:`Config`. ``main.py`` builds its argument parser from the
dataclass fields, so a field added here is immediately a ``--flag`` there, and the resolved config
is written next to the checkpoints (``config.json``) so any run can be reproduced or resumed.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from model import BACKBONES


@dataclass
class Config:
    # --- experiment -------------------------------------------------------------------------
    preset: str = "synthetic"
    dataset: str = "synthetic"  # synthetic | nih | odir | csv
    data_root: str = ""
    out_dir: str = ""  # default: runs/<preset>-<timestamp>
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0

    # --- model (METHOD.md "Architecture") ---------------------------------------------------
    backbone: str = "densenet121"  # densenet121 | resnet18 | resnet34 | resnet50 | tiny
    pretrained: bool = False
    pretrained_path: str = ""  # a torchvision state-dict file, for machines without internet
    prototype_dim: int = 256
    prototypes_per_class: int = 50
    image_size: int = 512

    # --- synthetic dataset ------------------------------------------------------------------
    synthetic_train_size: int = 1600
    synthetic_val_size: int = 400
    synthetic_test_size: int = 800
    synthetic_decorrelated_test_size: int = 800  # a second test split with every disease independent (0 = none)

    # --- data splits and sampling -----------------------------------------------------------
    val_fraction: float = 0.1  # share of the training list held out for model selection
    class_weight_cap: float = 100.0
    no_finding_weight_warmup: float = 2.0
    no_finding_weight_paired: float = 3.0
    samples_per_epoch: int = 0  # anchors drawn per epoch; 0 = number of training images

    # --- augmentation (METHOD.md "Pair sampling and views") ---------------------------------
    strong_augmentation: bool = True  # the shared strong transform; off: only the two views' own jitter
    crop_margin: float = 1.0625
    crop_scale_min: float = 0.5
    affine_degrees: float = 45.0
    affine_translate: float = 0.3
    affine_scale_min: float = 0.7
    affine_scale_max: float = 1.3
    affine_shear: float = 40.0

    # --- schedule (METHOD.md "Schedule") ----------------------------------------------------
    epochs: int = 41
    warmup_epochs: int = 15
    push_epochs: tuple[int, ...] = (35, 40)
    last_layer_epochs: int = 6
    batch_size: int = 24  # pairs per step in the paired stage; images per step in warm-up = 2x
    eval_batch_size: int = 64
    lr_backbone: float = 1e-4
    lr_add_on: float = 3e-3
    lr_prototypes: float = 3e-3
    lr_last_layer: float = 1e-4
    lr_milestones: tuple[int, ...] = (10, 20, 25, 30, 35)
    lr_gamma: float = 0.5
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    select_pushed_only: bool = True  # model selection only among prototype-grounded models
    # Not in the paper (1 = off; the synthetic preset uses 0.25): the push puts at most this share of a
    # class's prototypes on one feature-map cell (utils/projection.py, "cell cap").
    push_max_cell_share: float = 1.0
    max_stages: int = 0  # stop after this many schedule stages (0 = run to the end); resume later

    # --- losses (METHOD.md "Losses") --------------------------------------------------------
    weight_classification: float = 1.0
    weight_cluster: float = 0.02
    weight_separation: float = 0.02
    separation_margin: float = 2.0
    weight_cross_image: float = 0.5
    weight_interpretation: float = 0.5
    weight_prediction: float = 10.0
    # Not in the paper (0 = off; the synthetic preset uses 1): in warm-up, a 1 x 1 convolution reconstructs
    # from each cell's features the grey stride x stride pixel block at the cell's receptive-field centre
    # (losses.local_reconstruction_loss).
    weight_local_reconstruction: float = 0.0
    cross_image: bool = True  # ablation switch: cross-image common-semantics term
    interpretation_alignment: bool = True  # ablation switch: L_inte
    prediction_alignment: bool = True  # ablation switch: L_pred

    # --- performance and scale ----------------------------------------------------------------
    amp: str = "off"  # off | bf16 | fp16 (fp16 with a gradient scaler)
    channels_last: bool = False
    compile: bool = False
    sync_batchnorm: bool = False

    # --- real datasets (data/nih.py, data/odir.py, data/csv_source.py) ------------------------
    # csv: the split lists; odir: annotation spreadsheets that replace the automatic search.
    train_csv: str = ""
    val_csv: str = ""  # empty: a patient-disjoint --val-fraction of the training list
    test_csv: str = ""
    image_root: str = ""  # csv: image paths are relative to this (default --data-root, else the CSV's folder)
    image_column: str = ""  # csv: column holding the image path (default: the first column)
    label_column: str = ""  # csv: one "|"-separated label column (default: one 0/1 column per class)
    patient_column: str = ""  # csv: patient id column for patient-disjoint splits (default: auto)
    classes: tuple[str, ...] = ()  # csv: disease names in order (default: from the header or the labels)
    uncertain_label: str = "error"  # csv: what a -1 (uncertain) label means: error | zero | one
    boxes: str = ""  # csv: box file in the NIH BBox_List_2017.csv format, in image-file pixels
    split_seed: int = 0  # seed of the validation split carved from the training list
    odir_test_sets: tuple[str, ...] = ("on-site", "off-site")  # first = test, others = extra tests
    cache: bool = True  # real data: decode + resize every image once into a memory-mapped cache
    cache_dir: str = ""  # default: <data_root>/.cipl-cache, else ~/.cache/cipl
    verify_images: bool = True  # without the cache: decode every image before training
    decode_threads: int = 0  # threads for the pre-flight decode and the cache build (0 = CPU count)

    # --- interpretation and localisation ----------------------------------------------------
    localisation_threshold: float = 0.5  # evidence map -> box: share of the min-max normalised map
    gradcam_layer: str = "backbone"  # Grad-CAM target layer: backbone (last conv block) | add_on

    # --- monitoring -------------------------------------------------------------------------
    tensorboard: bool = True  # write TensorBoard event files under RUN/tensorboard/
    log_every: int = 50  # optimizer steps between the running means of the losses in TensorBoard

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown configuration fields: {', '.join(unknown)}")
        coerced = {}
        for name, value in values.items():
            if _is_tuple_field(known[name]) and value is not None:
                value = tuple(value)
            coerced[name] = value
        return cls(**coerced)

    @property
    def uses_alignment(self) -> bool:
        return self.interpretation_alignment or self.prediction_alignment


PRESETS: dict[str, dict] = {
    # The paper's NIH ChestX-ray14 setting (METHOD.md "Schedule").
    "nih": dict(preset="nih", dataset="nih", backbone="densenet121", pretrained=True, image_size=512),
    # The paper's ODIR setting: same schedule, milder affine augmentation (METHOD.md).
    "odir": dict(
        preset="odir", dataset="odir", backbone="densenet121", pretrained=True, image_size=512,
        affine_degrees=30.0, affine_scale_min=0.8, affine_scale_max=1.2, affine_shear=25.0,
    ),
    # The built-in proving ground: a 2-core CPU trains, pushes and tests it in about 5½ minutes, and it is
    # built so that localisation is possible and measured. Every value here, and why:
    "synthetic": dict(
        preset="synthetic", dataset="synthetic",
        # Stride 8 with reflecting padding (model.TinyBackbone): 16 x 16 feature maps at 128 px, each cell
        # sees a 59-px window, and no zero border tells a cell where it is. The stride-32 CNN it replaces
        # gave 4 x 4 maps whose cells each saw the whole image: its prototypes sat on one cell.
        backbone="tiny", pretrained=False,  # no ImageNet weights exist for it; nothing is downloaded
        image_size=128,  # 16 x 16 maps with stride 8; a nodule spans 4-9 px, a mass 20-31 px
        prototype_dim=64,  # D: a quarter of the paper's 256 keeps distances, co-attention and L_inte cheap
        # L_clst, L_sep and the margin stay the paper's (0.02, 0.02, 2) although squared distances shrink
        # with D. Rescaled to the paper's balance at D = 64 (0.08, 0.08, margin 0.5), four 2400-anchor runs
        # (seeds 6-9) grounded no more prototypes (-0.108, 95 % interval [-0.826, +0.611]), were less
        # selective in every seed (-0.074 [-0.131, -0.017]) and put 4 of 12 of a class on one cell in three.
        # Not in the paper: in warm-up each cell must also rebuild the 8 x 8 grey block at its own centre
        # (L_rec). CIPL's terms reward a cell beside a lesion, which sees it, as much as the cell on it. Over
        # twelve 2400-anchor seeds on this machine the term raised the disease prototypes grounded from
        # 0.505 +- 0.213 to 0.720 +- 0.060 (+0.215, 95 % interval [+0.072, +0.358]) and CIPL's pointing
        # game from 0.638 to 0.817; AUC moved +0.010 [-0.006, +0.026]. More runs piled 4 of 12 prototypes of
        # a class on one cell (6 of 12 against 3, within chance), and 33 of those 36 sit inside a lesion box
        # of their own class in their own image. Weight 3 cost warm-up about 0.16 validation AUC; 0.3 did not
        # narrow the spread between seeds. docs/proving_ground.md has the tables.
        weight_local_reconstruction=1.0,
        # M: several lesion patterns per class, 84 prototypes in all. With 8 the collapse rule (no cell or
        # image holding more than a quarter) allowed only 2 per cell, and an enlarged heart, which sits on
        # the same few cells in every image, tripped it in 6 of 16 trial runs; 12 allows 3 of 12.
        prototypes_per_class=12,
        synthetic_train_size=1600, synthetic_val_size=400, synthetic_test_size=800,  # render in ~20 s
        # The paper's shape (warm-up, paired training, two pushes each followed by last-layer training)
        # in 13 epochs of 800 anchors: about 4.5 minutes of training on 2 cores. A warm-up epoch costs
        # about a third of a paired one; 6 of them instead of 4 raised the mean validation AUC of 3-4
        # trial seeds from 0.85 to 0.86-0.89 and left fewer runs still climbing at the end.
        # The prototypes need more than this 6-minute budget: with --samples-per-epoch 2400 (3x, about
        # 11 minutes here) the disease prototypes grounded on the training split rose from 39 % to 72 %
        # and validation AUC from 0.86 to 0.98 (trial seeds 10-13, one H100). The README's
        # proving-ground figures use 2400; the default stays a run that finishes in minutes.
        epochs=13, warmup_epochs=6, push_epochs=(10, 12), last_layer_epochs=1, samples_per_epoch=800,
        # Not in the paper: the push's cell cap (at most 3 of a class's 12 prototypes on one cell). The heart
        # lies on the same few cells in every image, so 12 heart patches from 12 images land 4 on one cell
        # in 37 % of random draws; without the cap 6 of 12 runs (2400 anchors, with L_rec) piled 4 prototypes
        # of a class onto one cell, 33 of those 36 inside a lesion box of their own class. With it no run
        # did; it moved 1-3 prototypes in 6 of the 12 (half of them still grounded), and grounding changed by
        # -0.002 [-0.010, +0.005], AUC by at most 0.003 per run, pointing by at most 0.008.
        # Figures: docs/proving_ground.md.
        push_max_cell_share=0.25,
        lr_milestones=(10,),  # one halving, from the epoch of the first push (the paper: at epoch 10 of 41, then every 5)
        batch_size=16,  # pairs per step; 24 in the paper, fewer here so that a step costs ~0.4 s on a CPU
        class_weight_cap=10.0,  # six diseases at 11-19 % prevalence need no weight above 10
        lr_backbone=1e-3,  # trained from scratch here, unlike the paper's ImageNet-initialised DenseNet
        # A last-layer epoch here is 50 steps, against ~3,000 per NIH epoch: at the paper's 1e-4 the
        # weights did not move (validation AUC equal to 4 decimals before and after).
        lr_last_layer=1e-2,
        # The generator already draws anatomy, patient pose, exposure and lesions anew for every case; the
        # paper's shared strong transform (crop with aspect 0.5-2, flips, +-45 degree affine) exists to
        # stretch real images. At 300 warm-up steps it cost 0.17 validation AUC (0.62 against 0.79); with
        # --samples-per-epoch 2400 warm-up still ended near chance (0.53 and 0.50 against 0.93 and 0.90, seeds 6, 7).
        strong_augmentation=False,
        ema_decay=0.99,  # the teacher follows a student trained for ~500 steps, not ~100,000
        # Two cores: a loader process slows the two compute threads more than it helps (a paired epoch
        # took 27 s with one worker, 22-25 s without), and oneDNN's channels-last convolutions are ~12%
        # faster here.
        num_workers=0, channels_last=True,
    ),
}


def preset_config(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise ValueError(f"--preset {name} is not a preset; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[name], **overrides}
    return Config.from_dict(values)


# ----------------------------------------------------------------------------------------------
# Validation: every field's rule, checked before a run creates anything
# ----------------------------------------------------------------------------------------------
POSITIVE_INTS = ("epochs", "batch_size", "eval_batch_size", "prototype_dim", "prototypes_per_class",
                 "synthetic_train_size", "synthetic_val_size", "synthetic_test_size", "log_every")
NON_NEGATIVE_INTS = ("seed", "split_seed", "num_workers", "samples_per_epoch", "warmup_epochs", "last_layer_epochs",
                     "max_stages", "decode_threads", "synthetic_decorrelated_test_size")
NON_NEGATIVE_FLOATS = ("lr_backbone", "lr_add_on", "lr_prototypes", "lr_last_layer", "weight_decay",
                       "weight_classification", "weight_cluster", "weight_separation", "separation_margin",
                       "weight_cross_image", "weight_interpretation", "weight_prediction", "weight_local_reconstruction")
POSITIVE_FLOATS = ("lr_gamma", "class_weight_cap", "no_finding_weight_warmup", "no_finding_weight_paired",
                   "affine_scale_min", "affine_scale_max")
# name -> (low, high, low included, high included, what the number is)
RANGES = {
    "val_fraction": (0.0, 1.0, True, False, "a share of the training list's patients"),
    "crop_scale_min": (0.0, 1.0, False, True, "a share of the image's area"),
    "ema_decay": (0.0, 1.0, True, True, "the teacher's share per step"),
    "localisation_threshold": (0.0, 1.0, False, True, "a share of the normalised evidence map"),
    "affine_translate": (0.0, 1.0, True, True, "a share of the image side"),
    "affine_degrees": (0.0, 180.0, True, True, "degrees"),
    "push_max_cell_share": (0.0, 1.0, False, True, "a share of a class's prototypes"),
    "affine_shear": (0.0, 90.0, True, False, "degrees"),
}
CHOICES = {
    "dataset": ("synthetic", "nih", "odir", "csv"),
    "amp": ("off", "bf16", "fp16"),
    "uncertain_label": ("error", "zero", "one"),
    "gradcam_layer": ("backbone", "add_on"),
}
ODIR_TEST_SETS = ("on-site", "off-site")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 4096  # stride 32: below this there is no feature map


def _type_problem(value, hint) -> str | None:
    """What is wrong with the value's type (a config.json edited by hand), or None."""
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, tuple):
            return "must be a list"
        item = typing.get_args(hint)[0]
        return next((problem for v in value if (problem := _type_problem(v, item))), None)
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be a whole number"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        return None if math.isfinite(value) else "must be a finite number"
    return None if isinstance(value, hint) else f"must be {hint.__name__}"


def validate(config: Config) -> None:
    """Refuse a configuration that cannot run, naming the --flag at fault: raises ValueError.

    Called before a run creates anything (new run, --resume, --eval-only, --dry-run), so a bad value
    leaves no directory behind and never surfaces as a library's message deep inside training.
    Data-dependent checks (files, labels, images) are the pre-flight checks of data/preflight.py."""
    def refuse(name: str, rule: str):
        raise ValueError(f"{option_name(name)} {_shown(getattr(config, name))} {rule}")

    hints = _type_hints()
    for f in fields(Config):
        problem = _type_problem(getattr(config, f.name), hints[f.name])
        if problem:
            refuse(f.name, problem)
    if config.preset not in PRESETS:
        refuse("preset", f"is not a preset; choose one of {', '.join(PRESETS)}")
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            refuse(name, f"is not one of {', '.join(choices)}")
    if config.backbone not in BACKBONES:
        refuse("backbone", f"is not one of {', '.join(BACKBONES)}")
    if not DEVICE_PATTERN.fullmatch(config.device):
        refuse("device", "is not a device: use auto, cpu, cuda, cuda:N or mps")
    unknown = [name for name in config.odir_test_sets if name not in ODIR_TEST_SETS]
    if unknown:  # the reader's own wording
        raise ValueError(f"--odir-test-sets: unknown set(s) {', '.join(unknown)}; choose from {', '.join(ODIR_TEST_SETS)}")
    for name in POSITIVE_INTS:
        if getattr(config, name) < 1:
            refuse(name, "must be a positive whole number")
    for name in NON_NEGATIVE_INTS:
        if getattr(config, name) < 0:
            refuse(name, "must be 0 or more")
    for name in NON_NEGATIVE_FLOATS:
        if getattr(config, name) < 0:
            refuse(name, "must be 0 or more")
    for name in POSITIVE_FLOATS:
        if getattr(config, name) <= 0:
            refuse(name, "must be more than 0")
    for name, (low, high, low_in, high_in, meaning) in RANGES.items():
        value = getattr(config, name)
        inside = (low <= value if low_in else low < value) and (value <= high if high_in else value < high)
        if not inside:
            refuse(name, f"must be between {low:g} and {high:g} ({meaning}; {'[' if low_in else '('}{low:g}, "
                         f"{high:g}{']' if high_in else ')'})")
    size = config.image_size
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:  # the pre-flight check's wording
        refuse("image_size", f"is not a usable training resolution: the backbone has stride 32, so it must be "
                             f"between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} px (the paper uses 512)")
    if config.crop_margin < 1.0:
        refuse("crop_margin", "must be at least 1 (it is the augmentation margin over the image size)")
    if config.affine_scale_min > config.affine_scale_max:
        refuse("affine_scale_min", f"exceeds --affine-scale-max {config.affine_scale_max:g}")
    # The schedule (utils/training.py build_schedule) in the same words.
    if config.warmup_epochs > config.epochs:
        refuse("warmup_epochs", f"exceeds --epochs {config.epochs}")
    outside = [epoch for epoch in config.push_epochs if not 0 <= epoch < config.epochs]
    if outside:
        raise ValueError(f"--push-epochs {outside} outside the {config.epochs} epochs (0..{config.epochs - 1})")
    for name in ("push_epochs", "lr_milestones"):
        values = getattr(config, name)
        if any(b <= a for a, b in zip(values, values[1:])):
            refuse(name, "must be increasing, each epoch once")
    if any(milestone < 1 for milestone in config.lr_milestones):
        refuse("lr_milestones", "must be epochs from 1 on (the rates of epoch 0 are the initial ones)")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
_HELP = {
    # run
    "preset": "named starting point that fills in every option not given: synthetic (built-in data, CPU-friendly), "
              "nih or odir (the paper's settings); --help shows the defaults of the preset on the same command line",
    "out_dir": "run directory for config.json, log.txt, metrics.csv, checkpoints/, tensorboard/ and results "
               "(default runs/<preset>-<timestamp>)",
    "seed": "one random seed for the initial weights, the sampling and the augmentation (0 or more)",
    "max_stages": "stop after this many schedule stages (warm-up/paired/push/last-layer epochs), then continue "
                  "later with --resume; for time-limited jobs (0 = run the whole schedule)",
    "tensorboard": "write TensorBoard event files under RUN/tensorboard/ (losses, learning rates, AUCs, push "
                   "galleries); view with: tensorboard --logdir runs",
    "log_every": "optimizer steps between two running means of the loss terms in TensorBoard (a stage's "
                 "remaining steps give one more at its end)",
    # data
    "dataset": "data source: synthetic (built in), nih (ChestX-ray14), odir (fundus photos) or csv (any "
               "multi-label set described by CSV files)",
    "data_root": "dataset folder (nih: the folder holding Data_Entry_2017.csv; odir: the folder holding the "
                 "annotation spreadsheets and images)",
    "train_csv": "csv: training list (an image-path column and labels); odir: the training annotation file, "
                 "instead of the one found under --data-root",
    "val_csv": "csv/odir: validation list for model selection (default: a patient-disjoint --val-fraction of "
               "the training list)",
    "test_csv": "csv: test list; odir: on-site test annotation file; with --eval-only: an external test set to "
                "evaluate the checkpoint on (see 'Evaluate on your own images' in README.md)",
    "image_root": "csv: folder the CSV's image paths are relative to (default --data-root, else the CSV's own folder)",
    "image_column": "csv: name of the column holding the image path (default: the first column)",
    "label_column": "csv: name of one column of '|'-separated labels, e.g. 'Finding Labels' (default: one 0/1 "
                    "column per class)",
    "patient_column": "csv: name of the patient id column, so the validation split is patient-disjoint "
                      "(default: 'Patient ID' or a similar name if present)",
    "classes": "csv: disease names, in this order (default: the 0/1 columns of the header, or the labels found); "
               "No Finding is always derived, never listed",
    "uncertain_label": "csv: what a -1 (uncertain, as in CheXpert) label means: error (refuse), zero (negative) "
                       "or one (positive)",
    "boxes": "csv: ground-truth boxes for the localisation scores, in the NIH BBox_List_2017.csv format, in "
             "image-file pixels",
    "val_fraction": "share of the training list's patients held out for model selection, between 0 and 1 "
                    "(0.1 = a tenth; patient-disjoint where patient ids exist)",
    "split_seed": "seed of the validation split carved from the training list (independent of --seed, so a new "
                  "--seed keeps the same split)",
    "odir_test_sets": "odir: test annotation sets, from on-site and off-site; the first is the test split, the "
                      "others are reported as extra test sets",
    "synthetic_train_size": "synthetic: number of training images rendered",
    "synthetic_val_size": "synthetic: number of validation images rendered",
    "synthetic_test_size": "synthetic: number of test images rendered",
    "synthetic_decorrelated_test_size": "synthetic: images of a second test split, 'test_decorrelated', where every "
                                        "disease occurs independently at its usual prevalence (0 = none); a model that "
                                        "learnt a disease from its usual companion loses AUC there",
    "samples_per_epoch": "anchor images drawn by the class-balanced sampler per epoch (a paired epoch takes one "
                         "pair per anchor; 0 = the number of training images)",
    "class_weight_cap": "upper bound of a class's sampling weight w_c = (all positive labels) / (images of the "
                        "class); the paper caps the rarest classes at 100-150",
    "no_finding_weight_warmup": "factor on the No Finding class's sampling weight during warm-up epochs "
                                "(paper: 2)",
    "no_finding_weight_paired": "factor on the No Finding class's sampling weight during paired and "
                                "last-layer epochs (paper: 3)",
    # model
    "backbone": "feature extractor: densenet121 (the paper's), resnet18, resnet34, resnet50, or tiny (a "
                "small CNN for tests and the synthetic data)",
    "pretrained": "start the backbone from torchvision's ImageNet weights (downloaded on first use)",
    "pretrained_path": "file holding the backbone's ImageNet weights (a torchvision state dict), for machines "
                       "without internet",
    "prototype_dim": "dimension D of the features and prototypes (channels of the 1x1 top layer; paper: 256)",
    "prototypes_per_class": "prototypes per class M, No Finding included (paper: 50)",
    "image_size": "side of the square images the network sees, in pixels (paper: 512); a multiple of 32",
    # schedule
    "epochs": "training epochs in total, warm-up included (paper: 41)",
    "warmup_epochs": "epochs of warm-up at the start: single images, classification, cluster and separation "
                     "losses only (paper: 15)",
    "push_epochs": "epochs (counted from 0) after which the prototypes are pushed onto their nearest training "
                   "patches, each push followed by --last-layer-epochs (paper: 35 40)",
    "last_layer_epochs": "epochs that train only the last layer after each push (paper: 6)",
    "batch_size": "pairs per optimizer step in paired and last-layer epochs; warm-up steps take twice as many "
                  "single images (paper: 24); the global batch, split across torchrun processes",
    "lr_backbone": "Adam learning rate of the backbone and the 1x1 top layer (paper: 1e-4)",
    "lr_add_on": "Adam learning rate of the add-on layers (paper: 3e-3)",
    "lr_prototypes": "Adam learning rate of the prototype vectors (paper: 3e-3)",
    "lr_last_layer": "Adam learning rate of the last layer in last-layer epochs (paper: 1e-4)",
    "lr_milestones": "epochs (counted over warm-up and paired epochs) at which the backbone, add-on and "
                     "prototype learning rates are multiplied by --lr-gamma (paper: 10 20 25 30 35)",
    "lr_gamma": "factor applied to those learning rates at each milestone (paper: 0.5)",
    "weight_decay": "Adam weight decay of the backbone, add-on and prototypes (and of L_rec's decoder) (paper: 0)",
    "ema_decay": "decay of the EMA teacher per optimizer step: teacher = decay x teacher + (1 - decay) x "
                 "student (paper: 0.999)",
    "select_pushed_only": "choose the best checkpoint on validation only among pushed (prototype-grounded, "
                          "interpretable) models",
    "push_max_cell_share": "the cell cap, not in the paper: the push puts at most floor(share x M) of a class's M "
                           "prototypes on one feature-map cell (in any images); a prototype whose nearest free "
                           "patch lies on a full cell takes its nearest patch on another cell (paper: none, 1 = "
                           "off; the synthetic preset: 0.25, the collapse rule's quarter)",
    # losses and ablations
    "weight_classification": "weight of L_cls, the two-way No Finding vs disease cross-entropy (paper: 1)",
    "weight_cluster": "weight of L_clst, which pulls each image's features towards its classes' prototypes "
                      "(paper: 0.02)",
    "weight_separation": "weight of the separation hinge relu(margin - sep) on other classes' prototypes "
                         "(paper: 0.02)",
    "separation_margin": "margin of the separation hinge, in squared feature distance (paper: 2)",
    "weight_cross_image": "weight of L_cross, the cross-image co-attention term on the diseases two images "
                          "share (paper: 0.5)",
    "weight_interpretation": "weight of L_inte, the student-teacher similarity-map alignment (paper: 0.5)",
    "weight_prediction": "weight of L_pred, the student-teacher batch-relational prediction alignment "
                         "(paper: 10)",
    "weight_local_reconstruction": "weight of L_rec, a warm-up term that is not in the paper: a 1 x 1 convolution "
                                   "must rebuild, from each feature-map cell, the grey stride x stride pixel block "
                                   "at that cell's receptive-field centre, so that a cell's features describe "
                                   "what lies at its centre (paper: none, 0 = off; the synthetic preset: 1)",
    "cross_image": "ablation switch: with --no-cross-image the cross-image term L_cross is left out",
    "interpretation_alignment": "ablation switch: with --no-interpretation-alignment L_inte is left out",
    "prediction_alignment": "ablation switch: with --no-prediction-alignment L_pred is left out",
    # augmentation
    "crop_margin": "the random resized crop's output side as a multiple of --image-size, at least 1 "
                   "(paper: 1.0625); the image cache stores images at this size",
    "crop_scale_min": "smallest share of the image's area the random resized crop keeps, in (0, 1] "
                      "(paper: 0.5)",
    "strong_augmentation": "apply METHOD.md's shared strong transform (resized crop, one RandAugment-style op, "
                           "flips, affine) before the two views; off: each view gets only its own photometric "
                           "jitter, blur and tiny crop (the crop and affine options below then do nothing)",
    "affine_degrees": "largest random rotation, in degrees either way (paper: 45 NIH, 30 ODIR)",
    "affine_translate": "largest random shift, as a share of the image side (paper: 0.3)",
    "affine_scale_min": "smallest random zoom factor (paper: 0.7 NIH, 0.8 ODIR)",
    "affine_scale_max": "largest random zoom factor (paper: 1.3 NIH, 1.2 ODIR)",
    "affine_shear": "largest random shear, in degrees either way (paper: 40 NIH, 25 ODIR)",
    # evaluation
    "eval_batch_size": "images per batch for validation, testing, push and localisation",
    "localisation_threshold": "share of a min-max normalised evidence map above which pixels form the "
                              "predicted box, in (0, 1]",
    "gradcam_layer": "layer the Grad-CAM comparison looks at: backbone (its last block) or add_on",
    # performance
    "device": "where to compute: auto (this process's GPU if there is one, else the CPU), cpu, cuda, cuda:N or mps",
    "num_workers": "DataLoader worker processes per training process (0 = load in the main process)",
    "amp": "mixed precision: off, bf16 or fp16 (fp16 uses a gradient scaler); distances stay in float32",
    "channels_last": "channels-last memory format for the convolutions (faster with AMP on recent GPUs)",
    "compile": "run the network through torch.compile (slow first steps, faster later ones)",
    "sync_batchnorm": "synchronise BatchNorm statistics across GPUs under torchrun",
    "cache": "real data: decode and resize every image once into a memory-mapped cache, reused by later runs",
    "cache_dir": "folder of the image cache (default <data-root>/.cipl-cache, else ~/.cache/cipl)",
    "verify_images": "without the cache: decode every listed image before training, so a corrupt file stops "
                     "the run at once",
    "decode_threads": "threads for the pre-flight decode and the cache build (0 = twice the CPU count, at most 32)",
}

# The option groups of --help, in this order; every Config field is in exactly one.
OPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "run": ("preset", "out_dir", "seed", "max_stages", "tensorboard", "log_every"),
    "data": (
        "dataset", "data_root", "train_csv", "val_csv", "test_csv", "image_root", "image_column", "label_column",
        "patient_column", "classes", "uncertain_label", "boxes", "val_fraction", "split_seed", "odir_test_sets",
        "synthetic_train_size", "synthetic_val_size", "synthetic_test_size", "synthetic_decorrelated_test_size",
        "samples_per_epoch", "class_weight_cap", "no_finding_weight_warmup", "no_finding_weight_paired",
    ),
    "model": ("backbone", "pretrained", "pretrained_path", "prototype_dim", "prototypes_per_class", "image_size"),
    "schedule": (
        "epochs", "warmup_epochs", "push_epochs", "last_layer_epochs", "batch_size", "lr_backbone", "lr_add_on",
        "lr_prototypes", "lr_last_layer", "lr_milestones", "lr_gamma", "weight_decay", "ema_decay",
        "select_pushed_only", "push_max_cell_share",
    ),
    "losses and ablations": (
        "weight_classification", "weight_cluster", "weight_separation", "separation_margin", "weight_cross_image",
        "weight_interpretation", "weight_prediction", "weight_local_reconstruction", "cross_image",
        "interpretation_alignment", "prediction_alignment",
    ),
    "augmentation": (
        "strong_augmentation", "crop_margin", "crop_scale_min", "affine_degrees", "affine_translate", "affine_scale_min", "affine_scale_max",
        "affine_shear",
    ),
    "evaluation": ("eval_batch_size", "localisation_threshold", "gradcam_layer"),
    "performance": (
        "device", "num_workers", "amp", "channels_last", "compile", "sync_batchnorm", "cache", "cache_dir",
        "verify_images", "decode_threads",
    ),
}


def _is_tuple_field(f: dataclasses.Field) -> bool:
    return typing.get_origin(_field_type(f)) is tuple


@functools.cache
def _type_hints() -> dict:
    return typing.get_type_hints(Config)  # evaluates every annotation: once, not per field


def _field_type(f: dataclasses.Field):
    return _type_hints()[f.name]


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _shown(value) -> str:
    """A default as a user would type it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(str(item) for item in value) if value else "none"
    if value == "":
        return "not set"
    return str(value)


_METAVARS = {
    **{name: "DIR" for name in ("data_root", "out_dir", "image_root", "cache_dir")},
    **{name: "FILE" for name in ("train_csv", "val_csv", "test_csv", "boxes", "pretrained_path")},
    **{name: "COLUMN" for name in ("image_column", "label_column", "patient_column")},
    "push_epochs": "EPOCH", "lr_milestones": "EPOCH", "classes": "NAME", "odir_test_sets": "SET", "backbone": "NAME",
    "device": "DEVICE",
}
_TYPE_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _default_note(name: str, preset: str, value) -> str:
    """' (default with --preset P: V)', or nothing where the help already says what an unset value means."""
    if name == "preset":
        return " (default: synthetic)"
    if value in ("", ()) and "(default" in _HELP[name]:
        return ""
    return f" (default with --preset {preset}: {_shown(value)})"


def add_config_arguments(parser: argparse.ArgumentParser, preset: str = "synthetic") -> dict[str, argparse._ArgumentGroup]:
    """Add one ``--flag`` per Config field, in the groups of OPTION_GROUPS; returns the groups by name.

    Defaults are left unset (so that --preset fills them in); the help shows ``preset``'s defaults."""
    defaults = preset_config(preset).to_dict()
    groups = {title: parser.add_argument_group(title) for title in OPTION_GROUPS}
    group_of = {name: title for title, names in OPTION_GROUPS.items() for name in names}
    choices = dict(CHOICES, preset=tuple(PRESETS))
    for f in fields(Config):
        hint = _field_type(f)
        help_text = (_HELP[f.name] + _default_note(f.name, preset, defaults[f.name])).replace("%", "%%")
        kwargs: dict = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        group = groups[group_of[f.name]]
        if hint is bool:
            group.add_argument(option_name(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        metavar = "{" + ",".join(choices[f.name]) + "}" if f.name in choices else _METAVARS.get(f.name)
        if typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            group.add_argument(option_name(f.name), nargs="*", type=item, metavar=metavar or _TYPE_METAVARS[item], **kwargs)
        else:
            group.add_argument(option_name(f.name), type=hint, metavar=metavar or _TYPE_METAVARS[hint], **kwargs)
    return groups


def config_overrides(args: argparse.Namespace) -> dict:
    """The Config fields that were given on the command line."""
    tuple_fields = {f.name for f in fields(Config) if _is_tuple_field(f)}
    names = {f.name for f in fields(Config)}
    return {name: tuple(value) if name in tuple_fields else value for name, value in vars(args).items() if name in names}


def load_config(path: str | Path) -> Config:
    return Config.from_dict(json.loads(Path(path).read_text()))


# Fields that may change when a run is resumed: they affect where and how fast it runs, not what
# it computes.
RUNTIME_FIELDS = frozenset({
    "device", "num_workers", "max_stages", "out_dir", "data_root", "eval_batch_size", "amp", "channels_last", "compile",
    "cache", "cache_dir", "verify_images", "decode_threads", "image_root", "localisation_threshold", "gradcam_layer",
    "tensorboard", "log_every",
})
