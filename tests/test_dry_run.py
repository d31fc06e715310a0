"""--dry-run: the plan of a run after the pre-flight checks, and nothing written anywhere."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

import main
from datasets import class_sampling_weights
from model import build_model
from settings import preset_config
from test_sources import make_nih, nih_config
from data.registry import build_datasets
from utils.dry_run import parameter_counts, stage_plan, steps_per_epoch


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and modification time."""
    entries = {}
    for directory, folders, files in os.walk(folder):
        for name in folders + files:
            status = os.stat(os.path.join(directory, name))
            entries[os.path.relpath(os.path.join(directory, name), folder)] = (status.st_size, status.st_mtime_ns)
    return entries


def test_dry_run_on_nih_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    root = make_nih(tmp_path / "nih")
    before = snapshot(tmp_path)
    out_dir = tmp_path / "run"
    arguments = ["--preset", "nih", "--data-root", str(root), "--val-fraction", "0.25", "--out-dir", str(out_dir),
                 "--decode-threads", "2", "--no-progress"]
    assert main.main([*arguments, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert snapshot(tmp_path) == before  # no run directory, no .cipl-cache, nothing touched
    assert not out_dir.exists() and not (root / ".cipl-cache").exists()

    configuration = text.split("Configuration (config.json):\n", 1)[1].split("\n\n", 1)[0]
    expected = main.resolve_config(main.parse_args(arguments)).to_dict()
    assert json.loads(configuration) == json.loads(json.dumps(expected))
    assert json.loads(configuration)["backbone"] == "densenet121" and json.loads(configuration)["cache"] is True

    splits = build_datasets(nih_config(root, cache=False))  # the same lists, split the same way
    assert f"Splits: train {len(splits.train)} images, val {len(splits.val)} images, test {len(splits.test)} images" in text
    weights = class_sampling_weights(splits.train.targets, 100.0, 3.0)
    for column, name in enumerate(splits.class_names):
        counts = [int(dataset.targets[:, column].sum()) for dataset in (splits.train, splits.val, splits.test)]
        row = next(line[len(name):].split() for line in text.splitlines() if line.startswith(name + " "))
        assert row[:3] == [str(count) for count in counts], name
        assert float(row[4]) == float(f"{weights[column]:.3g}"), name
    # The paper's schedule, stages with equal settings on one row: rates the stage trains with.
    assert "Schedule: 55 stages over 41 epochs, 2 pushes" in text
    rows = [line.split() for line in text.splitlines()]
    assert ["0-9", "warmup", "0-9", "0.0001", "0.003", "0.003", "0.0001", "1"] in [r[:8] for r in rows]
    assert ["10-14", "warmup", "10-14", "5e-05", "0.0015", "0.0015", "0.0001", "1"] in [r[:8] for r in rows]
    assert any(line.startswith("37-42   last layer  6 after the push at 35") for line in text.splitlines())
    total = sum(p.numel() for p in build_model(preset_config("nih"), load_pretrained=False).parameters())
    assert f"Parameters: {total:,} = backbone and top layer" in text


def test_dry_run_runs_the_pre_flight_checks(tmp_path, capsys):
    root = make_nih(tmp_path / "nih")
    (root / "images" / "00000005_000.png").write_text("not an image")
    out_dir = tmp_path / "run"
    code = main.main(["--preset", "nih", "--data-root", str(root), "--val-fraction", "0.25", "--out-dir", str(out_dir),
                      "--decode-threads", "2", "--no-progress", "--dry-run"])
    assert code == 2
    assert "00000005_000.png" in capsys.readouterr().err
    assert not out_dir.exists() and not (root / ".cipl-cache").exists()


def test_steps_per_epoch_follows_the_loader():
    assert steps_per_epoch(100, 24) == 4  # the incomplete last batch is dropped
    assert steps_per_epoch(10, 24) == 1  # unless it is the only one
    assert steps_per_epoch(100, 12, world_size=2) == 4  # 50 per process
    assert steps_per_epoch(101, 10, world_size=2) == 5  # 51 per process


def test_stage_plan_rates_and_parameters():
    config = preset_config("synthetic", epochs=6, warmup_epochs=2, push_epochs=(4,), last_layer_epochs=2,
                           lr_milestones=(1, 3), lr_gamma=0.1, samples_per_epoch=40, batch_size=8)
    plan = stage_plan(config, num_train=1000)
    assert [stage.kind for stage in plan] == ["warmup", "warmup", "paired", "paired", "paired", "push",
                                              "last_layer", "last_layer", "paired"]
    # Milestones count warm-up and paired epochs: x0.1 from the second, x0.01 from the fourth.
    np.testing.assert_allclose([stage.learning_rates["lr_backbone"] for stage in plan],
                               [1e-3, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5])
    assert {stage.learning_rates["lr_last_layer"] for stage in plan} == {config.lr_last_layer}
    assert [stage.steps for stage in plan] == [2, 2, 5, 5, 5, 0, 5, 5, 5]  # warm-up steps take 16 images
    model = build_model(config)
    counts = parameter_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["prototypes"] == model.num_prototypes * config.prototype_dim


def test_stage_plan_names_the_local_decoder_only_when_it_trains():
    def warm_up_line(weight):
        config = preset_config("synthetic", epochs=2, warmup_epochs=1, push_epochs=(1,),
                               weight_local_reconstruction=weight)
        return stage_plan(config, num_train=100)[0].trains

    assert "local decoder" in warm_up_line(1.0)
    assert "local decoder" not in warm_up_line(0.0)


def test_stage_plan_names_the_cell_cap_only_when_it_binds_the_push():
    def push_line(share):
        config = preset_config("synthetic", epochs=2, warmup_epochs=1, push_epochs=(1,), push_max_cell_share=share)
        return next(stage for stage in stage_plan(config, num_train=100) if stage.kind == "push").trains

    assert "at most 3 of a class's 12 prototypes per cell" in push_line(0.25)
    assert "cell cap" not in push_line(1.0)
