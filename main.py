"""Train and test CIPL.

    python main.py                                   # the built-in synthetic dataset, CPU-friendly
    python main.py --preset nih --data-root DIR      # the paper's NIH ChestX-ray14 setting
    python main.py --resume runs/RUN                 # continue an interrupted run exactly
    python main.py --eval-only --checkpoint runs/RUN/checkpoints/best.pt
    python main.py --eval-only --checkpoint CKPT --test-csv NEW.csv --image-root DIR --out-dir OUT
    python main.py --preset nih --data-root DIR --dry-run   # the plan, after the pre-flight checks

A run directory holds config.json, log.txt, metrics.csv, checkpoints/{last,best}.pt, tensorboard/ and,
once the schedule is complete, results.json with validation and test AUCs of the best (validation) model.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.registry import dataset_scores
from datasets import DataError, build_datasets
from model import CIPL, PretrainedWeightsUnavailable, build_model
from settings import (
    PRESETS, RUNTIME_FIELDS, Config, add_config_arguments, config_overrides, option_name, preset_config, validate,
)
from utils.checkpoint import (
    CheckpointError, atomic_write_json, atomic_write_text, check_compatible, load_checkpoint, load_model_weights,
    restore_rng_state, rng_state, save_checkpoint,
)
from utils.distributed import all_gather_objects, barrier, broadcast_object, current_context, destroy, init_distributed_mode, local_only
from utils.dry_run import describe
from utils.external import EXTERNAL_FIELDS, build_external_set, external_config, external_results, parse_label_map, write_predictions
from utils.localisation import localisation_report
from utils.metrics import json_safe, per_class_auc
from utils.plots import write_report_plots, write_roc
from utils.prototype_quality import evaluate_prototype_quality, format_quality, quality_scalars
from utils.tensorboard_log import TensorBoardLog, require_tensorboard
from utils.training import LOSS_TERMS, Trainer, TrainingDiverged, build_schedule, predict, resolve_device, seed_everything

logger = logging.getLogger("cipl")

METRIC_COLUMNS = (
    ["stage_index", "stage", "epoch", "loss", *LOSS_TERMS, "val_mean_auc",
     "lr_backbone", "lr_add_on", "lr_prototypes", "lr_last_layer", "seconds"]
)
USER_ERRORS = (DataError, CheckpointError, PretrainedWeightsUnavailable, TrainingDiverged, ValueError, FileNotFoundError)


def get_args_parser(preset: str = "synthetic") -> argparse.ArgumentParser:
    """The command line; its help shows ``preset``'s defaults (see :func:`parse_args`)."""
    parser = argparse.ArgumentParser(
        usage="%(prog)s [--preset {synthetic,nih,odir}] [options]",
        description="Train and test CIPL (Cross- and Intra-image Prototypical Learning).",
        epilog=f"Defaults shown are those of --preset {preset}; give --preset NAME before --help to see another "
               f"preset's. Every option but those of main.py itself is a field of Config in settings.py.",
    )
    groups = add_config_arguments(parser, preset)
    run = groups["run"]
    run.add_argument("--resume", default="", metavar="RUN",
                     help="continue the run in this directory (or from this checkpoint file) exactly where it stopped")
    run.add_argument("--eval-only", action="store_true",
                     help="evaluate --checkpoint instead of training: on its own validation and test splits, or on "
                          "an external set given with --test-csv")
    run.add_argument("--checkpoint", default="", metavar="FILE",
                     help="checkpoint to evaluate with --eval-only (a .pt file, or a run directory for its last.pt)")
    run.add_argument("--dry-run", action="store_true",
                     help="resolve the configuration, run the pre-flight checks and print the plan (splits, class "
                          "counts, sampler weights, stages, model size, steps per epoch); writes nothing")
    run.add_argument("--no-progress", action="store_true", help="no progress bars, log lines only (for batch jobs)")
    evaluation = groups["evaluation"]
    evaluation.add_argument("--label-map", default="", metavar="OLD=NEW,...",
                            help="with --eval-only --test-csv: rename the external set's labels to the model's class "
                                 "names, e.g. 'Infiltrate=Infiltration,Pleural Effusion=Effusion'")
    evaluation.add_argument("--ignore-unknown-labels", action="store_true",
                            help="with --eval-only --test-csv: leave out labels the model has no class for, instead "
                                 "of stopping")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; a first look for --preset lets --help show that preset's defaults."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--preset", default="synthetic")
    preset = early.parse_known_args(argv)[0].preset
    return get_args_parser(preset if preset in PRESETS else "synthetic").parse_args(argv)


class TqdmHandler(logging.StreamHandler):
    """Console logging that does not tear through progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(log_file: Path | None = None) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        if getattr(handler, "_cipl", False):
            root.removeHandler(handler)
            handler.close()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [TqdmHandler()]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._cipl = True
        root.addHandler(handler)


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = config_overrides(args)
    config = preset_config(overrides.pop("preset", "synthetic"), **overrides)
    validate(config)
    return config


def config_for_resume(state: dict, args: argparse.Namespace, training: bool = True,
                      allowed: frozenset[str] = frozenset()) -> Config:
    """The checkpoint's configuration with the command line's runtime overrides (and those in
    ``allowed``), validated. ``training``: the checkpoint must also carry what resuming needs
    (evaluation needs only config and model)."""
    needed = ("config", "model", "next_stage", "rng", "best") if training else ("config", "model")
    missing = [key for key in needed if key not in state]
    if missing:
        raise CheckpointError(f"{state.get('path', 'checkpoint')} lacks {', '.join(missing)}: not a complete CIPL training checkpoint")
    config = Config.from_dict(state["config"])
    config.max_stages = 0  # a limit of the interrupted invocation, not of the run
    for name, value in config_overrides(args).items():
        if name in RUNTIME_FIELDS or name in allowed:
            setattr(config, name, value)
        elif getattr(config, name) != value:
            raise ValueError(f"{option_name(name)} cannot change when resuming (the run has {getattr(config, name)!r})")
    validate(config)
    return config


def default_run_dir(config: Config) -> Path:
    return Path(config.out_dir or f"runs/{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}")


class MetricsLog:
    """metrics.csv: one row per schedule stage. On resume, rows of stages that will run again are dropped."""

    def __init__(self, path: Path, keep_below: int | None = None):
        self.path = path
        rows = []
        if path.exists() and keep_below is not None:
            with path.open(newline="") as stream:
                rows = [row for row in csv.DictReader(stream) if int(row["stage_index"]) < keep_below]
        text = io.StringIO()
        writer = csv.DictWriter(text, METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, text.getvalue())  # an interrupted resume keeps the old history

    def append(self, row: dict) -> None:
        with self.path.open("a", newline="") as stream:
            csv.DictWriter(stream, METRIC_COLUMNS).writerow({key: row.get(key, "") for key in METRIC_COLUMNS})


def build_datasets_once_per_node(config: Config, context):
    """Under torchrun, local rank 0 reads the data and builds any image cache first; the other
    ranks of the node then open the finished cache instead of building their own copies. An error
    on any rank stops every rank with the same message."""
    splits, problem = None, None
    if context.local_rank == 0:
        try:
            splits = build_datasets(config)
        except USER_ERRORS as error:
            problem = str(error)
    if context.enabled:
        barrier()
        problems = [p for p in all_gather_objects(problem) if p]
        problem = problems[0] if problems else None
    if problem:
        raise DataError(problem)
    return splits if splits is not None else build_datasets(config)


def train(config: Config, resume_state: dict | None = None, progress: bool = True) -> Path:
    """Run (or continue) the whole schedule; returns the run directory."""
    validate(config)
    context = current_context()
    if config.tensorboard and context.is_main:
        require_tensorboard()
    run_dir, problem = None, None
    if context.is_main:  # rank 0 names the run directory; the other ranks take its word
        if resume_state is not None:
            run_dir = Path(resume_state["path"]).resolve().parent.parent
        else:
            run_dir = default_run_dir(config)
            if (run_dir / "checkpoints" / "last.pt").exists():
                problem = f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out-dir"
    run_dir, problem = broadcast_object((run_dir, problem))
    if problem:
        raise ValueError(problem)
    config.out_dir = str(run_dir)
    seed_everything(config.seed)
    device = resolve_device(config.device, context)
    splits = build_datasets_once_per_node(config, context)  # before the run directory: bad data leaves nothing behind
    model = build_model(config, load_pretrained=resume_state is None)

    if context.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir / "log.txt")
        atomic_write_json(run_dir / "config.json", config.to_dict())
    logger.info("run directory %s; device %s; %d train / %d val / %d test images; %d classes; %d prototypes",
                run_dir, device, len(splits.train), len(splits.val), len(splits.test), model.num_classes, model.num_prototypes)

    trainer = Trainer(config, model, splits, device, progress=progress)
    schedule = build_schedule(config)
    start, best = 0, dict(val_mean_auc=float("-inf"), stage_index=None)
    if resume_state is not None:
        check_compatible(resume_state, model)
        trainer.load_state_dict(resume_state)
        restore_rng_state(resume_state["rng"])
        start, best = resume_state["next_stage"], resume_state["best"]
        logger.info("resuming at stage %d of %d", start, len(schedule))
    metrics = MetricsLog(run_dir / "metrics.csv", keep_below=start) if context.is_main else None
    # A resumed run drops what an interrupted invocation logged after its checkpoint (purge_step).
    board = trainer.board = TensorBoardLog(
        run_dir / "tensorboard" if context.is_main and config.tensorboard else None,
        purge_step=trainer.global_step + 1 if resume_state is not None else None,
    )
    pushes_scheduled = any(stage.kind == "push" for stage in schedule)

    best_model = None
    stop = len(schedule) if not config.max_stages else min(len(schedule), start + config.max_stages)
    for stage_index in range(start, stop):
        stage = schedule[stage_index]
        began = time.perf_counter()
        rates = trainer.learning_rates()  # the rates this stage trains with; the scheduler steps at its end
        terms = trainer.run_stage(stage, stage_index)
        validation = trainer.evaluate(splits.val)
        row = dict(stage_index=stage_index, stage=stage.kind, epoch=stage.epoch, val_mean_auc=validation["mean_auc"],
                   **terms, **rates, seconds=round(time.perf_counter() - began, 2))
        if metrics is not None:
            metrics.append(row)
        if stage.kind == "push":
            with local_only():  # rank 0 draws the galleries alone
                board.log_push(trainer.model, splits.train, trainer.provenance, config.image_size, trainer.global_step,
                               batch_size=min(config.eval_batch_size, 16))
                if trainer.push_quality is not None:
                    board.log_scalars("push/quality", quality_scalars(trainer.push_quality), trainer.global_step)
        board.log_stage(terms, validation, rates, trainer.global_step)
        logger.info("%s: loss %s, val mean AUC %.4f", stage.name,
                    f"{terms['loss']:.4f}" if "loss" in terms else "-", validation["mean_auc"])

        state = dict(trainer.state_dict(), config=config.to_dict(), next_stage=stage_index + 1,
                     stage=stage.kind, epoch=stage.epoch, rng=rng_state())
        eligible = model.is_pushed or not (config.select_pushed_only and pushes_scheduled)
        if eligible and validation["mean_auc"] > best["val_mean_auc"]:
            best = dict(val_mean_auc=validation["mean_auc"], stage_index=stage_index, stage=stage.name)
            best_model = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
            if context.is_main:
                save_checkpoint(run_dir / "checkpoints" / "best.pt", dict(state, best=best))
            logger.info("new best model (val mean AUC %.4f)", validation["mean_auc"])
        if context.is_main:
            save_checkpoint(run_dir / "checkpoints" / "last.pt", dict(state, best=best))
        board.flush()  # what the checkpoint covers is on disk
        barrier()

    if stop < len(schedule):
        logger.info("stopped after %d of %d stages (--max-stages); continue with --resume %s", stop, len(schedule), run_dir)
        board.close()
        return run_dir
    if best_model is None and best["stage_index"] is not None:  # resumed after the best was saved
        best_model = broadcast_object(load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"] if context.is_main else None)
    final_report(trainer, splits, run_dir, best, best_model)
    board.close()
    return run_dir


def evaluate_splits(trainer: Trainer, splits) -> tuple[dict, tuple, np.ndarray]:
    """AUCs (and the dataset's own scores, e.g. ODIR's) on val, test and any extra test sets, plus
    the test split's (probabilities, targets) so the ROC plot needs no second inference pass, and its
    prototype scores [N, P] for the prototypes' selectivity."""
    results, predictions = {}, {}
    for name, dataset in [("val", splits.val), ("test", splits.test), *(splits.extra_tests or {}).items()]:
        predictions[name] = trainer.predict(dataset, with_scores=name == "test")
        probabilities, targets = predictions[name][:2]
        results[name] = per_class_auc(targets, probabilities, dataset.disease_names)
        results[name].update(dataset_scores(trainer.config, name, targets, probabilities))
    probabilities, targets, test_scores = predictions["test"]
    return results, (probabilities, targets), test_scores


def add_interpretation(results: dict, trainer: Trainer, splits, test_scores: np.ndarray,
                       provenance: list[dict] | None) -> None:
    """What the explanation is worth, next to the AUCs: ``prototypes`` (diversity, grounding on the
    training boxes, selectivity on the test split; with the reported model's push ``provenance``, what
    the cell cap moved) and ``localisation`` (test split; each extra test split with boxes gets its own
    under its name)."""
    results["prototypes"] = evaluate_prototype_quality(
        trainer.model, splits.train, trainer.config.image_size, trainer.device, trainer.config.eval_batch_size,
        test_scores, splits.test.targets, provenance=provenance)
    logger.info("prototype quality (selectivity on the test split):\n%s", format_quality(results["prototypes"]))
    localisation = localisation_report(trainer.model, splits.test, trainer.config, trainer.device, trainer.progress)
    if localisation is not None:
        results["localisation"] = localisation
    for name, dataset in (splits.extra_tests or {}).items():
        localisation = localisation_report(trainer.model, dataset, trainer.config, trainer.device, trainer.progress)
        if localisation is not None:
            results[name]["localisation"] = localisation


def final_report(trainer: Trainer, splits, run_dir: Path, best: dict, best_model: dict | None) -> dict:
    if best_model is not None:
        trainer.model.load_state_dict(best_model)
    else:
        logger.warning("no checkpoint was eligible as best; reporting the last model")
    results, test_predictions, test_scores = evaluate_splits(trainer, splits)
    results["best"] = best
    if not current_context().is_main:
        return results
    with local_only():  # localisation and figures: rank 0 alone, no collectives
        # The best model's push provenance is its checkpoint's (the trainer's is the last stage's).
        provenance = (load_checkpoint(run_dir / "checkpoints" / "best.pt").get("prototype_provenance")
                      if best_model is not None else trainer.provenance)
        add_interpretation(results, trainer, splits, test_scores, provenance)
        if best_model is not None:
            record_unselective_prototypes(run_dir / "checkpoints" / "best.pt", results["prototypes"])
        atomic_write_json(run_dir / "results.json", json_safe(results))  # last: a finished run
        logger.info("best model (%s): val mean AUC %.4f, test mean AUC %.4f",
                    best.get("stage"), results["val"]["mean_auc"], results["test"]["mean_auc"])
        logger.info("wrote %s", run_dir / "results.json")
        write_report_plots(*test_predictions, splits.test.disease_names, run_dir, run_dir / "metrics.csv")
        if trainer.board is not None:
            trainer.board.log_final(results, run_dir / "roc.png", trainer.global_step)
    return results


def record_unselective_prototypes(checkpoint: Path, quality: dict) -> None:
    """Write into ``checkpoint`` the prototypes its final test found matching images with and without their
    class alike (``unselective_prototypes``), so that interpretable_reasoning.py can mark them; None when
    the test split gave no selectivity, which replaces any older record."""
    state = load_checkpoint(checkpoint)
    state.pop("path")
    save_checkpoint(checkpoint, dict(state, unselective_prototypes=quality["overall"].get("unselective_prototypes")))


def evaluate_checkpoint(checkpoint: str, args: argparse.Namespace, progress: bool = True) -> Path:
    state = load_checkpoint(checkpoint)
    config = config_for_resume(state, args, training=False)
    run_dir = Path(config_overrides(args).get("out_dir") or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    context = current_context()
    splits = build_datasets_once_per_node(config, context)
    model = build_model(config, load_pretrained=False)
    check_compatible(state, model)
    load_model_weights(model, state)  # before the output folder exists: a refusal leaves nothing behind
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir / "log.txt")
    trainer = Trainer(config, model, splits, resolve_device(config.device, context), progress=progress)
    results, test_predictions, test_scores = evaluate_splits(trainer, splits)
    results["checkpoint"] = str(Path(checkpoint).resolve())
    if not context.is_main:
        return run_dir
    with local_only():  # localisation and figures: rank 0 alone, no collectives
        add_interpretation(results, trainer, splits, test_scores, state.get("prototype_provenance"))
        atomic_write_json(run_dir / "results.json", json_safe(results))
        logger.info("val mean AUC %.4f, test mean AUC %.4f; wrote %s",
                    results["val"]["mean_auc"], results["test"]["mean_auc"], run_dir / "results.json")
        write_report_plots(*test_predictions, splits.test.disease_names, run_dir,
                           Path(state["path"]).resolve().parent.parent / "metrics.csv")
    return run_dir


def evaluate_external(checkpoint: str, args: argparse.Namespace, progress: bool = True) -> Path:
    """--eval-only --test-csv: the checkpoint on a CSV-described external set (utils/external.py).
    Only that set is read; the output folder is created once the set has passed its checks."""
    state = load_checkpoint(checkpoint)
    command_line = config_overrides(args)
    config = external_config(config_for_resume(state, args, training=False, allowed=EXTERNAL_FIELDS), command_line)
    class_names = state.get("class_names") or state.get("model_description", {}).get("class_names")
    if not class_names:
        raise CheckpointError(f"{state['path']} does not record its class names: it cannot be matched to another set")
    external = build_external_set(config, list(class_names), parse_label_map(args.label_map), args.ignore_unknown_labels)
    model = CIPL(class_names, backbone=config.backbone, prototype_dim=config.prototype_dim,
                 prototypes_per_class=config.prototypes_per_class)
    check_compatible(state, model)
    load_model_weights(model, state)
    run_dir = Path(command_line.get("out_dir") or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    context = current_context()
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir / "log.txt")
    device = resolve_device(config.device, context)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
    probabilities, _ = predict(model.to(device), external.dataset, device, config.image_size, config.eval_batch_size,
                               config.num_workers, progress and context.is_main, amp_dtype)
    if not context.is_main:
        return run_dir
    with local_only():  # localisation and figures: rank 0 alone, no collectives
        results = dict(checkpoint=str(Path(state["path"]).resolve()), **external_results(external, probabilities))
        localisation = localisation_report(model, external.dataset, config, device, progress)
        if localisation is not None:
            results["localisation"] = localisation
        atomic_write_json(run_dir / "results.json", json_safe(results))
        write_predictions(run_dir / "predictions.csv", external, probabilities)
        columns = external.evaluated_columns
        write_roc(run_dir / "roc.png", external.dataset.targets[:, columns], probabilities[:, columns],
                  external.evaluated, title=f"ROC on {external.source.name}")
        logger.info("%s: mean AUC %.4f over %d diseases%s; wrote %s", external.source.name, results["test"]["mean_auc"],
                    len(external.evaluated), f" ({', '.join(external.missing)} not in the set)" if external.missing else "",
                    run_dir)
    return run_dir


def dry_run(args: argparse.Namespace) -> str:
    """--dry-run: the plan of the run the same command line would start (or resume), after the
    pre-flight checks; writes nothing (no run directory, no image cache, no downloaded weights)."""
    state = load_checkpoint(args.resume) if args.resume else None
    config = config_for_resume(state, args) if state is not None else resolve_config(args)
    run_dir = Path(state["path"]).resolve().parent.parent if state is not None else default_run_dir(config)
    if state is None and (run_dir / "checkpoints" / "last.pt").exists():
        raise ValueError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out-dir")
    splits = build_datasets(dataclasses.replace(config, cache=False))  # the checks, without building the cache
    model = build_model(config, load_pretrained=False)
    return describe(config, splits, model, run_dir, current_context().world_size,
                    start_stage=state["next_stage"] if state is not None else 0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    context = init_distributed_mode(config_overrides(args).get("device", "auto"))
    setup_logging()
    if not context.is_main:  # under torchrun only rank 0 reports progress
        logging.getLogger().setLevel(logging.WARNING)
    progress = not args.no_progress
    try:
        external = "test_csv" in config_overrides(args)
        if (args.label_map or args.ignore_unknown_labels) and not (args.eval_only and external):
            raise ValueError("--label-map and --ignore-unknown-labels apply to --eval-only --test-csv (an external set)")
        if args.dry_run:
            if args.eval_only:
                raise ValueError("--dry-run plans a training run; it does not combine with --eval-only")
            print(dry_run(args))
        elif args.eval_only:
            if not args.checkpoint:
                raise ValueError("--eval-only needs --checkpoint PATH")
            if external:
                evaluate_external(args.checkpoint, args, progress)
            else:
                evaluate_checkpoint(args.checkpoint, args, progress)
        elif args.resume:
            state = load_checkpoint(args.resume)
            train(config_for_resume(state, args), resume_state=state, progress=progress)
        else:
            train(resolve_config(args), progress=progress)
    except USER_ERRORS as error:
        # One line: an error raised in a DataLoader worker arrives with the worker's traceback.
        logger.error("%s", str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__)
        return 2 if not isinstance(error, TrainingDiverged) else 3
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
