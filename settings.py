"""Configuration: one dataclass, named presets, and a command line generated from it.

Every knob of a run lives in :class:`Config`. ``main.py`` builds its argument parser from the
dataclass fields, so a field added here is immediately a ``--flag`` there, and the resolved config
is written next to the checkpoints (``config.json``) so any run can be reproduced or resumed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, fields
from pathlib import Path


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

    # --- data splits and sampling -----------------------------------------------------------
    val_fraction: float = 0.1  # share of the training list held out for model selection
    class_weight_cap: float = 100.0
    no_finding_weight_warmup: float = 2.0
    no_finding_weight_paired: float = 3.0
    samples_per_epoch: int = 0  # anchors drawn per epoch; 0 = number of training images

    # --- augmentation (METHOD.md "Pair sampling and views") ---------------------------------
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
    max_stages: int = 0  # stop after this many schedule stages (0 = run to the end); resume later

    # --- losses (METHOD.md "Losses") --------------------------------------------------------
    weight_classification: float = 1.0
    weight_cluster: float = 0.02
    weight_separation: float = 0.02
    separation_margin: float = 2.0
    weight_cross_image: float = 0.5
    weight_interpretation: float = 0.5
    weight_prediction: float = 10.0
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
    # The built-in proving ground: small enough to train, push and test on a 2-core CPU in minutes.
    # The schedule keeps the paper's shape (warm-up -> paired -> push + last layer, twice).
    "synthetic": dict(
        preset="synthetic", dataset="synthetic", backbone="tiny", pretrained=False, num_workers=1,
        image_size=128, prototype_dim=64, prototypes_per_class=8,
        synthetic_train_size=1600, synthetic_val_size=400, synthetic_test_size=800,
        epochs=12, warmup_epochs=5, push_epochs=(9, 11), last_layer_epochs=2, samples_per_epoch=1200,
        batch_size=16, lr_milestones=(8,), class_weight_cap=10.0,
        lr_backbone=1e-3,  # trained from scratch here, unlike the paper's ImageNet-initialised DenseNet
        affine_degrees=15.0, affine_translate=0.06, affine_scale_min=0.9, affine_scale_max=1.1,
        affine_shear=10.0, crop_scale_min=0.8, ema_decay=0.99,
    ),
}


def preset_config(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[name], **overrides}
    return Config.from_dict(values)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
_HELP = {
    "preset": "named starting point: synthetic (default, CPU-friendly), nih or odir (the paper's settings)",
    "dataset": "data source: synthetic | nih | odir | csv",
    "data_root": "dataset folder (NIH: holds Data_Entry_2017.csv; ODIR: the annotation spreadsheet)",
    "out_dir": "run directory (default runs/<preset>-<timestamp>)",
    "seed": "one seed for weights, sampling and augmentation",
    "device": "auto, cpu, cuda or cuda:N",
    "num_workers": "DataLoader worker processes",
    "backbone": "densenet121 | resnet18 | resnet34 | resnet50 | tiny (tests only)",
    "pretrained": "start the backbone from torchvision's ImageNet weights (downloads them)",
    "pretrained_path": "load ImageNet weights for the backbone from this file instead of downloading",
    "prototype_dim": "prototype / feature dimension D",
    "prototypes_per_class": "prototypes per class M",
    "image_size": "training and evaluation resolution in pixels",
    "val_fraction": "share of the training list held out (patient-disjoint where possible) for model selection",
    "class_weight_cap": "upper bound of a class's sampling weight",
    "samples_per_epoch": "anchors drawn per epoch (0 = number of training images)",
    "push_epochs": "epochs after which prototypes are pushed onto training patches",
    "batch_size": "pairs per step (paired stage); the warm-up uses the same number of images (2x)",
    "lr_milestones": "epochs at which the joint learning rates are multiplied by --lr-gamma",
    "ema_decay": "EMA teacher decay",
    "select_pushed_only": "select the best checkpoint only among pushed (prototype-grounded) models",
    "max_stages": "stop after this many schedule stages, then continue later with --resume (0 = all)",
    "cross_image": "ablation switch for the cross-image co-attention term L_cross",
    "interpretation_alignment": "ablation switch for the interpretation-level alignment L_inte",
    "prediction_alignment": "ablation switch for the prediction-level alignment L_pred",
    "amp": "mixed precision: off, bf16 or fp16 (fp16 uses a gradient scaler); distances stay float32",
    "channels_last": "channels-last memory format for the convolutions (faster with AMP on recent GPUs)",
    "compile": "torch.compile the network",
    "sync_batchnorm": "synchronise BatchNorm statistics across GPUs under torchrun",
    # real datasets (data/nih.py, data/odir.py, data/csv_source.py)
    "train_csv": "csv: training list (a CSV with an image-path column and labels); odir: training annotation file",
    "val_csv": "csv/odir: validation list (default: a patient-disjoint --val-fraction of the training list)",
    "test_csv": "csv: test list; odir: on-site test annotation file (default: found under --data-root)",
    "image_root": "csv: folder the image paths are relative to (default --data-root, else the CSV's folder)",
    "image_column": "csv: column holding the image path (default: the first column)",
    "label_column": "csv: one column of '|'-separated labels, e.g. 'Finding Labels' (default: one 0/1 column per class)",
    "patient_column": "csv: patient id column, for patient-disjoint validation splits (default: 'Patient ID' etc. if present)",
    "classes": "csv: disease names in this order (default: the 0/1 columns of the header, or the labels found); No Finding is derived",
    "uncertain_label": "csv: meaning of a -1 label (CheXpert's 'uncertain'): error | zero | one",
    "boxes": "csv: ground-truth boxes in the NIH BBox_List_2017.csv format, in image-file pixels",
    "split_seed": "seed of the patient-disjoint validation split (independent of --seed)",
    "odir_test_sets": "odir: test annotation sets, first is the test split, the rest are reported as extra tests",
    "cache": "decode and resize every image once into a memory-mapped cache, reused across runs",
    "cache_dir": "cache folder (default <data-root>/.cipl-cache, or ~/.cache/cipl)",
    "verify_images": "without the cache: decode every listed image before training (pre-flight check)",
    "decode_threads": "threads for the pre-flight decode and the cache build (0 = CPU count)",
}


def _is_tuple_field(f: dataclasses.Field) -> bool:
    return typing.get_origin(_field_type(f)) is tuple


def _field_type(f: dataclasses.Field):
    hints = typing.get_type_hints(Config)
    return hints[f.name]


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per Config field. Defaults are left unset so presets can fill them in."""
    group = parser.add_argument_group("configuration (defaults come from --preset)")
    for f in fields(Config):
        hint = _field_type(f)
        help_text = _HELP.get(f.name, f.name.replace("_", " "))
        default = PRESETS["synthetic"].get(f.name, f.default)
        help_text += f" [synthetic: {default}]"
        kwargs: dict = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if hint is bool:
            group.add_argument(option_name(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(hint) is tuple:
            group.add_argument(option_name(f.name), nargs="*", type=typing.get_args(hint)[0], **kwargs)
        else:
            group.add_argument(option_name(f.name), type=hint, **kwargs)


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
})
