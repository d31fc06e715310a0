"""The schedule end to end on tiny data: output contract, exact resume, NaN handling, stage rules."""
import csv
import json

import pytest
import torch

import losses
import main
from utils.checkpoint import load_checkpoint
from utils.dry_run import stage_plan
from utils.training import Stage, TrainingDiverged, build_schedule


def test_schedule_reads_like_the_paper():
    from settings import preset_config

    schedule = build_schedule(preset_config("nih"))
    kinds = [stage.kind for stage in schedule]
    assert kinds[:15] == ["warmup"] * 15
    assert kinds.count("paired") == 26
    assert kinds.count("push") == 2
    assert kinds.count("last_layer") == 12
    push_at = [stage.epoch for stage in schedule if stage.kind == "push"]
    assert push_at == [35, 40]
    after_first_push = schedule.index(Stage("push", 35))
    assert [s.kind for s in schedule[after_first_push + 1 : after_first_push + 8]] == ["last_layer"] * 6 + ["paired"]


def test_full_run_writes_the_output_contract(config_factory):
    config = config_factory()
    run_dir = main.train(config, progress=False)
    for name in ("config.json", "log.txt", "metrics.csv", "checkpoints/last.pt", "checkpoints/best.pt", "results.json"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    diseases = ["Atelectasis", "Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumothorax"]
    for split in ("val", "test", "test_decorrelated"):
        assert set(results[split]["auc"]) == set(diseases)
        assert 0.0 <= results[split]["mean_auc"] <= 1.0
    # The explanation is reported next to the AUCs: prototype quality and localisation on both test splits.
    quality = results["prototypes"]
    assert set(quality["per_class"]) == set(diseases) | {"No Finding"}
    assert quality["overall"]["pushed"] == 14 and quality["overall"]["grounding_evaluable"] > 0
    # ... with what the features would allow: prototypes copied from the lesions' centre cells.
    assert 0.0 <= quality["overall"]["centre_cell_grounded"] <= 1.0
    assert all(quality["per_class"][name]["centre_cell_lesions"] > 0 for name in diseases)
    assert all(entry["prototypes"] == 2 and "selectivity" in entry for entry in quality["per_class"].values())
    for localisation in (results["localisation"], results["test_decorrelated"]["localisation"]):
        assert set(localisation["methods"]) == {"cipl", "gradcam"} and localisation["map_size"] == [8, 8]
        assert 0.0 <= localisation["pointing_ceiling"]["mean"] <= 1.0
        assert 0.0 <= localisation["pointing_random"]["mean"] <= localisation["pointing_ceiling"]["mean"]
    with (run_dir / "metrics.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == len(build_schedule(config))
    assert {"classification", "cluster", "separation", "cross_image", "interpretation", "prediction",
            "val_mean_auc", "lr_backbone", "lr_last_layer"} <= set(rows[0])
    assert rows[-1]["stage"] == "last_layer" and rows[1]["cross_image"] != ""
    assert all(row["local_reconstruction"] == "" for row in rows) == (config.weight_local_reconstruction == 0)
    # Each row shows the rates its stage trained with: lr_milestones (2,) halves them from epoch 2 on.
    assert [float(row["lr_backbone"]) for row in rows[:3]] == pytest.approx([config.lr_backbone] * 2 + [config.lr_backbone / 2])
    plan = stage_plan(config, config.synthetic_train_size)  # what --dry-run prints
    for row, planned in zip(rows, plan, strict=True):
        for key in ("lr_backbone", "lr_add_on", "lr_prototypes", "lr_last_layer"):
            assert float(row[key]) == pytest.approx(planned.learning_rates[key]), (row["stage_index"], key)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["backbone"] == "tiny" and saved["push_epochs"] == [2, 3]

    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    for key in ("model", "teacher", "optimizers", "schedulers", "stage", "epoch", "rng", "config",
                "class_names", "prototype_provenance", "next_stage"):
        assert key in state, key
    assert state["teacher"] is not None
    assert state["global_step"] == sum(planned.steps + (planned.kind == "push") for planned in plan)
    provenance = state["prototype_provenance"]
    assert len(provenance) == 7 * 2 and all(record["image_id"].startswith("synthetic-train-") for record in provenance)
    # Model selection is among pushed models only, so the best model is grounded.
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert (best["model"]["prototype_source_index"] >= 0).all()
    # ... and after the final test it names the prototypes that matched every image alike, for the reasoning figure.
    assert best["unselective_prototypes"] == quality["overall"]["unselective_prototypes"]


def test_same_seed_same_weights_and_resume_is_exact(config_factory):
    straight = main.train(config_factory("straight"), progress=False)
    interrupted_config = config_factory("interrupted", max_stages=3)
    interrupted = main.train(interrupted_config, progress=False)
    assert not (interrupted / "results.json").exists()
    state = load_checkpoint(interrupted)
    assert state["next_stage"] == 3
    resumed_config = main.config_for_resume(state, main.get_args_parser().parse_args([]))
    main.train(resumed_config, resume_state=state, progress=False)

    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(interrupted / "checkpoints" / "last.pt")
    for part in ("model", "teacher"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    assert json.loads((straight / "results.json").read_text())["test"] == json.loads((interrupted / "results.json").read_text())["test"]
    with (interrupted / "metrics.csv").open() as stream:
        assert [int(row["stage_index"]) for row in csv.DictReader(stream)] == list(range(len(build_schedule(resumed_config))))


def test_local_reconstruction_trains_its_decoder_in_warm_up_only_and_resumes_exactly(config_factory):
    options = dict(warmup_epochs=2, weight_local_reconstruction=1.0)
    straight = main.train(config_factory("straight", **options), progress=False)
    # The same run in three pieces: stage 0 (warm-up), stage 1 (warm-up), the rest.
    pieces = config_factory("pieces", max_stages=1, **options)
    main.train(pieces, progress=False)
    after_first_stage = load_checkpoint(pieces.out_dir)["model"]
    after_stage = []
    for max_stages in (1, 0):
        state = load_checkpoint(pieces.out_dir)
        after_stage.append(state["local_decoder"])
        resumed = main.config_for_resume(state, main.get_args_parser().parse_args(["--max-stages", str(max_stages)]))
        main.train(resumed, resume_state=state, progress=False)
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(pieces.out_dir)
    for part in ("model", "teacher", "local_decoder"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    assert not torch.equal(after_stage[0]["weight"], after_stage[1]["weight"])  # the second warm-up epoch trains it
    assert torch.equal(after_stage[1]["weight"], b["local_decoder"]["weight"])  # nothing after warm-up does
    with (straight / "metrics.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [row["stage"] for row in rows if row["local_reconstruction"]] == ["warmup", "warmup"]
    # The decoder is the trainer's, not the model's: the model's weights are those of any CIPL network.
    assert not any(key.startswith("local_decoder") for key in a["model"])
    # ... and the term trains the model: the same seed without it ends warm-up elsewhere.
    without = main.train(config_factory("without", max_stages=1, warmup_epochs=2, weight_local_reconstruction=0.0),
                         progress=False)
    assert not torch.equal(load_checkpoint(without)["model"]["prototypes"], after_first_stage["prototypes"])


def test_local_decoder_draws_from_a_generator_of_its_own():
    from model import CIPL
    from utils.training import build_local_decoder

    model = CIPL(["a", "No Finding"], backbone="tiny", prototype_dim=16, prototypes_per_class=2)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    decoder = build_local_decoder(model)
    assert torch.equal(torch.get_rng_state(), before)  # every other draw of the run stays as it was
    assert decoder.weight.shape == (64, 16, 1, 1)  # the tiny backbone's 8 x 8 blocks
    assert decoder.weight.abs().max() <= 16 ** -0.5 and not decoder.bias.any()
    assert torch.equal(build_local_decoder(model).weight, decoder.weight)


def test_different_seed_different_weights(config_factory):
    a = main.train(config_factory("a", max_stages=1), progress=False)
    b = main.train(config_factory("b", max_stages=1, seed=1), progress=False)
    wa = load_checkpoint(a)["model"]["prototypes"]
    wb = load_checkpoint(b)["model"]["prototypes"]
    assert not torch.equal(wa, wb)
    assert not (a / "tensorboard").exists()  # tensorboard=False (tests/conftest.py) writes no event files


def test_nan_loss_stops_with_stage_epoch_step_and_keeps_last_checkpoint(config_factory, monkeypatch, capsys):
    run_dir = main.train(config_factory(max_stages=1), progress=False)
    last = run_dir / "checkpoints" / "last.pt"
    before = last.read_bytes()

    def exploding(logits, targets):
        return logits.sum() * float("nan")

    monkeypatch.setattr(losses, "classification_loss", exploding)
    with pytest.raises(TrainingDiverged, match=r"stage paired, epoch 1, step 0: .*classification=nan"):
        main.train(main.config_for_resume(load_checkpoint(run_dir), main.get_args_parser().parse_args([])),
                   resume_state=load_checkpoint(run_dir), progress=False)
    assert last.read_bytes() == before
    assert not (run_dir / "results.json").exists()
    # Through the command line: one line, non-zero exit.
    assert main.main(["--resume", str(run_dir), "--no-progress"]) == 3
    assert "non-finite loss in stage paired, epoch 1, step 0" in capsys.readouterr().err
    assert last.read_bytes() == before


def test_last_layer_stage_changes_only_the_last_layer_and_keeps_its_sign_rules(config_factory):
    from datasets import build_datasets
    from model import build_model
    from utils.training import Trainer

    config = config_factory()
    trainer = Trainer(config, build_model(config), build_datasets(config), torch.device("cpu"), progress=False)
    schedule = build_schedule(config)
    for index in range(schedule.index(Stage("push", 2)) + 1):
        trainer.run_stage(schedule[index], index)
    with torch.no_grad():  # make the rule do something: negative own-class and non-zero off-class weights
        trainer.model.last_layer.weight.add_(torch.randn_like(trainer.model.last_layer.weight) * 0.1)
    before = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    index = schedule.index(Stage("last_layer", 2, 0))
    trainer.run_stage(schedule[index], index)
    after = trainer.model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"last_layer.weight"}
    weight = after["last_layer.weight"]
    identity = trainer.model.class_identity
    assert torch.all(weight[identity == 0] == 0)
    assert torch.all(weight[identity == 1] >= 0)


def test_resume_refuses_a_changed_setting(config_factory):
    run_dir = main.train(config_factory(max_stages=1), progress=False)
    assert main.main(["--resume", str(run_dir), "--prototype-dim", "32", "--no-progress"]) == 2


def test_checkpoint_of_another_configuration_is_refused(config_factory, tmp_path):
    from model import build_model
    from utils.checkpoint import CheckpointError, check_compatible

    run_dir = main.train(config_factory(max_stages=1), progress=False)
    state = load_checkpoint(run_dir)
    other = build_model(config_factory(prototypes_per_class=3))
    with pytest.raises(CheckpointError, match="prototypes_per_class"):
        check_compatible(state, other)
    not_ours = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, not_ours)
    with pytest.raises(CheckpointError, match="not a CIPL checkpoint"):
        load_checkpoint(not_ours)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(garbage)


def test_weights_that_do_not_fit_are_refused_in_one_line():
    from model import CIPL
    from utils.checkpoint import CheckpointError, load_model_weights

    model = CIPL(["A", "No Finding"], backbone="tiny", prototype_dim=8, prototypes_per_class=1)
    state = dict(model=model.state_dict(), path="other.pt")
    state["model"]["backbone.0.weight"] = torch.zeros(4, 3, 3, 3)  # another first convolution
    with pytest.raises(CheckpointError, match=r"other.pt: its weights do not fit this model \(.*backbone.0.weight"):
        load_model_weights(model, state)


def test_eval_only_writes_results(config_factory, tmp_path):
    run_dir = main.train(config_factory(), progress=False)
    out = tmp_path / "eval"
    code = main.main(["--eval-only", "--checkpoint", str(run_dir / "checkpoints" / "best.pt"), "--out-dir", str(out), "--no-progress"])
    assert code == 0
    evaluated = json.loads((out / "results.json").read_text())
    trained = json.loads((run_dir / "results.json").read_text())
    assert evaluated["test"]["mean_auc"] == pytest.approx(trained["test"]["mean_auc"])


def test_cli_builds_config_from_preset_and_flags():
    args = main.get_args_parser().parse_args(
        ["--preset", "nih", "--epochs", "3", "--warmup-epochs", "1", "--push-epochs", "1", "2", "--no-cross-image",
         "--lr-backbone", "0.5"]
    )
    config = main.resolve_config(args)
    assert config.dataset == "nih" and config.backbone == "densenet121" and config.prototypes_per_class == 50
    assert config.epochs == 3 and config.warmup_epochs == 1 and config.push_epochs == (1, 2) and config.cross_image is False
    assert config.lr_backbone == 0.5 and config.interpretation_alignment is True


def test_training_the_prototypes_after_a_push_drops_their_provenance(config_factory):
    from datasets import build_datasets
    from model import build_model
    from utils.training import Trainer

    config = config_factory()
    trainer = Trainer(config, build_model(config), build_datasets(config), torch.device("cpu"), progress=False)
    schedule = build_schedule(config)
    after_first_round = schedule.index(Stage("paired", 3))
    for index in range(after_first_round):
        trainer.run_stage(schedule[index], index)
    assert trainer.model.is_pushed and trainer.provenance
    trainer.run_stage(schedule[after_first_round], after_first_round)
    assert not trainer.model.is_pushed and trainer.provenance == []
    assert (trainer.model.prototype_source_index == -1).all()


def test_schedule_rejects_push_epochs_outside_the_run(config_factory):
    with pytest.raises(ValueError, match="outside the 4 epochs"):
        build_schedule(config_factory(push_epochs=(2, 4)))


def test_resume_accepts_unchanged_tuple_options(config_factory):
    run_dir = main.train(config_factory(max_stages=1), progress=False)
    state = load_checkpoint(run_dir)
    args = main.get_args_parser().parse_args(["--push-epochs", "2", "3", "--max-stages", "1"])
    config = main.config_for_resume(state, args)
    assert config.push_epochs == (2, 3) and config.max_stages == 1
