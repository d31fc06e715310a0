"""The command line explains itself, and every configuration rule refuses a bad value before a run
creates anything, naming the flag."""
from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

import main
from settings import OPTION_GROUPS, PRESETS, Config, load_config, preset_config, validate


def option_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if action.option_strings and not isinstance(action, argparse._HelpAction)]


def test_every_option_has_a_help_text_that_is_not_its_name():
    parser = main.get_args_parser()
    actions = option_actions(parser)
    assert len(actions) > len(dataclasses.fields(Config))  # main.py's own options too
    for action in actions:
        text = (action.help or "").strip()
        assert text, f"{action.option_strings[0]} has no help"
        described = re.sub(r"\s*\(default with --preset \w+: [^)]*\)$", "", text)
        for option in action.option_strings:
            name = option.lstrip("-").replace("-", " ")
            assert described.lower() != name.lower() and len(described) > len(name) + 10, (option, described)


def test_options_are_grouped():
    assert list(OPTION_GROUPS) == ["run", "data", "model", "schedule", "losses and ablations", "augmentation",
                                   "evaluation", "performance"]
    grouped = [name for names in OPTION_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(Config))  # each field exactly once
    parser = main.get_args_parser()
    titles = {group.title: {action.dest for action in group._group_actions} for group in parser._action_groups}
    assert {"lr_backbone", "lr_milestones", "push_epochs"} <= titles["schedule"]
    assert {"cross_image", "weight_prediction"} <= titles["losses and ablations"]
    assert {"label_map", "ignore_unknown_labels", "eval_batch_size"} <= titles["evaluation"]


@pytest.mark.parametrize("preset, image_size, backbone", [("nih", "512", "densenet121"), ("synthetic", "128", "tiny"),
                                                          ("odir", "512", "densenet121")])
def test_help_shows_the_defaults_of_the_preset_on_the_command_line(preset, image_size, backbone, capsys):
    with pytest.raises(SystemExit) as stop:
        main.main(["--preset", preset, "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"--image-size N side of the square images the network sees, in pixels (paper: 512); a multiple of 32 " \
           f"(default with --preset {preset}: {image_size})" in text
    assert f"(default with --preset {preset}: {backbone})" in text
    shear = {"nih": "40.0", "odir": "25.0", "synthetic": "40.0"}[preset]
    assert f"largest random shear, in degrees either way (paper: 40 NIH, 25 ODIR) (default with --preset {preset}: {shear})" in text
    strong = {"nih": "on", "odir": "on", "synthetic": "off"}[preset]
    assert f"(the crop and affine options below then do nothing) (default with --preset {preset}: {strong})" in text


def test_every_preset_is_valid():
    for name in PRESETS:
        validate(preset_config(name))


BAD_VALUES = [
    (["--batch-size", "-3"], "--batch-size -3 must be a positive whole number"),
    (["--eval-batch-size", "0"], "--eval-batch-size 0 must be a positive"),
    (["--epochs", "0"], "--epochs 0 must be a positive"),
    (["--image-size", "16"], "--image-size 16 is not a usable training resolution"),
    (["--image-size", "8192"], "--image-size 8192 is not a usable training resolution"),
    (["--prototypes-per-class", "0"], "--prototypes-per-class 0"),
    (["--prototype-dim", "0"], "--prototype-dim 0"),
    (["--synthetic-train-size", "0"], "--synthetic-train-size 0"),
    (["--log-every", "0"], "--log-every 0"),
    (["--samples-per-epoch", "-1"], "--samples-per-epoch -1 must be 0 or more"),
    (["--num-workers", "-1"], "--num-workers -1"),
    (["--seed", "-1"], "--seed -1"),
    (["--split-seed", "-2"], "--split-seed -2"),
    (["--max-stages", "-1"], "--max-stages -1"),
    (["--decode-threads", "-4"], "--decode-threads -4"),
    (["--val-fraction", "1.5"], "--val-fraction 1.5 must be between 0 and 1"),
    (["--crop-scale-min", "0"], "--crop-scale-min 0.0 must be between 0 and 1"),
    (["--ema-decay", "1.5"], "--ema-decay 1.5 must be between 0 and 1"),
    (["--localisation-threshold", "0"], "--localisation-threshold 0.0"),
    (["--affine-translate", "2"], "--affine-translate 2.0"),
    (["--affine-degrees", "200"], "--affine-degrees 200.0"),
    (["--affine-shear", "90"], "--affine-shear 90.0"),
    (["--affine-scale-max", "1.1", "--affine-scale-min", "1.5"], "--affine-scale-min 1.5 exceeds --affine-scale-max 1.1"),
    (["--crop-margin", "0.9"], "--crop-margin 0.9 must be at least 1"),
    (["--lr-backbone", "-0.1"], "--lr-backbone -0.1 must be 0 or more"),
    (["--lr-last-layer", "-1"], "--lr-last-layer -1.0"),
    (["--lr-gamma", "0"], "--lr-gamma 0.0 must be more than 0"),
    (["--weight-decay", "-1"], "--weight-decay -1.0"),
    (["--weight-cluster", "-0.02"], "--weight-cluster -0.02"),
    (["--class-weight-cap", "0"], "--class-weight-cap 0.0"),
    (["--no-finding-weight-paired", "0"], "--no-finding-weight-paired 0.0"),
    (["--lr-backbone", "nan"], "--lr-backbone nan must be a finite number"),
    (["--preset", "chexpert"], "--preset chexpert is not a preset"),
    (["--dataset", "imagenet"], "--dataset imagenet is not one of synthetic, nih, odir, csv"),
    (["--backbone", "vgg16"], "--backbone vgg16 is not one of"),
    (["--device", "gpu"], "--device gpu is not a device"),
    (["--amp", "fp8"], "--amp fp8 is not one of off, bf16, fp16"),
    (["--uncertain-label", "maybe"], "--uncertain-label maybe is not one of error, zero, one"),
    (["--gradcam-layer", "head"], "--gradcam-layer head is not one of backbone, add_on"),
    (["--odir-test-sets", "onsite"], "--odir-test-sets: unknown set(s) onsite"),
    (["--epochs", "12", "--warmup-epochs", "13"], "--warmup-epochs 13 exceeds --epochs 12"),
    (["--epochs", "12", "--push-epochs", "12"], "--push-epochs [12] outside the 12 epochs (0..11)"),
    (["--epochs", "12", "--push-epochs", "11", "9"], "--push-epochs 11 9 must be increasing"),
    (["--lr-milestones", "8", "4"], "--lr-milestones 8 4 must be increasing"),
    (["--lr-milestones", "0"], "--lr-milestones 0 must be epochs from 1 on"),
    (["--label-map", "A=B"], "--label-map and --ignore-unknown-labels apply to --eval-only --test-csv"),
]


@pytest.mark.parametrize("arguments, message", BAD_VALUES, ids=[" ".join(case[0]) for case in BAD_VALUES])
def test_a_bad_value_is_refused_naming_its_flag_and_nothing_is_created(arguments, message, tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main.main([*arguments, "--out-dir", str(out_dir), "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_hand_edited_config_json_is_checked_too(tmp_path):
    path = tmp_path / "config.json"
    preset_config("synthetic").save(path)
    path.write_text(path.read_text().replace('"batch_size": 16', '"batch_size": "16"'))
    with pytest.raises(ValueError, match="--batch-size 16 must be a whole number"):
        validate(load_config(path))
    path.write_text(path.read_text().replace('"batch_size": "16"', '"batch_size": 16').replace('"cache": true', '"cache": "yes"'))
    with pytest.raises(ValueError, match="--cache yes must be true or false"):
        validate(load_config(path))
