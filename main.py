"""Train and test CIPL.

    python main.py                                   # the built-in synthetic dataset, CPU-friendly
    python main.py --preset nih --data-root DIR      # the paper's NIH ChestX-ray14 setting
    python main.py --resume runs/RUN                 # continue an interrupted run exactly
    python main.py --eval-only --checkpoint runs/RUN/checkpoints/best.pt

A run directory holds config.json, log.txt, metrics.csv, checkpoints/{last,best}.pt and, once the
schedule is complete, results.json with validation and test AUCs of the best (validation) model.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from data.registry import dataset_scores
from datasets import DataError, build_datasets
from model import PretrainedWeightsUnavailable, build_model
from settings import RUNTIME_FIELDS, Config, add_config_arguments, config_overrides, option_name, preset_config
from utils.checkpoint import (
    CheckpointError, atomic_write_json, atomic_write_text, check_compatible, load_checkpoint, restore_rng_state, rng_state,
    save_checkpoint,
)
from utils.distributed import all_gather_objects, barrier, broadcast_object, current_context, destroy, init_distributed_mode, local_only
from utils.localisation import localisation_report
from utils.metrics import json_safe, per_class_auc
from utils.plots import write_report_plots
from utils.training import LOSS_TERMS, Trainer, TrainingDiverged, build_schedule, resolve_device, seed_everything

logger = logging.getLogger("cipl")

METRIC_COLUMNS = (
    ["stage_index", "stage", "epoch", "loss", *LOSS_TERMS, "val_mean_auc",
     "lr_backbone", "lr_add_on", "lr_prototypes", "lr_last_layer", "seconds"]
)
USER_ERRORS = (DataError, CheckpointError, PretrainedWeightsUnavailable, TrainingDiverged, ValueError, FileNotFoundError)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train and test CIPL (Cross- and Intra-image Prototypical Learning).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--resume", default="", help="run directory or checkpoint to continue from")
    parser.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the val and test splits")
    parser.add_argument("--checkpoint", default="", help="checkpoint to evaluate with --eval-only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    add_config_arguments(parser)
    return parser


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
    return preset_config(overrides.pop("preset", "synthetic"), **overrides)


def config_for_resume(state: dict, args: argparse.Namespace, training: bool = True) -> Config:
    """The checkpoint's configuration with the command line's runtime overrides. ``training``: the
    checkpoint must also carry what resuming needs (evaluation needs only config and model)."""
    needed = ("config", "model", "next_stage", "rng", "best") if training else ("config", "model")
    missing = [key for key in needed if key not in state]
    if missing:
        raise CheckpointError(f"{state.get('path', 'checkpoint')} lacks {', '.join(missing)}: not a complete CIPL training checkpoint")
    config = Config.from_dict(state["config"])
    config.max_stages = 0  # a limit of the interrupted invocation, not of the run
    for name, value in config_overrides(args).items():
        if name in RUNTIME_FIELDS:
            setattr(config, name, value)
        elif getattr(config, name) != value:
            raise ValueError(f"{option_name(name)} cannot change when resuming (the run has {getattr(config, name)!r})")
    return config


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
    context = current_context()
    run_dir, problem = None, None
    if context.is_main:  # rank 0 names the run directory; the other ranks take its word
        if resume_state is not None:
            run_dir = Path(resume_state["path"]).resolve().parent.parent
        else:
            run_dir = Path(config.out_dir or f"runs/{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
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
    pushes_scheduled = any(stage.kind == "push" for stage in schedule)

    best_model = None
    stop = len(schedule) if not config.max_stages else min(len(schedule), start + config.max_stages)
    for stage_index in range(start, stop):
        stage = schedule[stage_index]
        began = time.perf_counter()
        terms = trainer.run_stage(stage, stage_index)
        validation = trainer.evaluate(splits.val)
        row = dict(stage_index=stage_index, stage=stage.kind, epoch=stage.epoch, val_mean_auc=validation["mean_auc"],
                   **terms, **trainer.learning_rates(), seconds=round(time.perf_counter() - began, 2))
        if metrics is not None:
            metrics.append(row)
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
        barrier()

    if stop < len(schedule):
        logger.info("stopped after %d of %d stages (--max-stages); continue with --resume %s", stop, len(schedule), run_dir)
        return run_dir
    if best_model is None and best["stage_index"] is not None:  # resumed after the best was saved
        best_model = broadcast_object(load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"] if context.is_main else None)
    final_report(trainer, splits, run_dir, best, best_model)
    return run_dir


def evaluate_splits(trainer: Trainer, splits) -> tuple[dict, tuple]:
    """AUCs (and the dataset's own scores, e.g. ODIR's) on val, test and any extra test sets, plus
    the test split's (probabilities, targets) so the ROC plot needs no second inference pass."""
    results, predictions = {}, {}
    for name, dataset in [("val", splits.val), ("test", splits.test), *(splits.extra_tests or {}).items()]:
        probabilities, targets = predictions[name] = trainer.predict(dataset)
        results[name] = per_class_auc(targets, probabilities, dataset.disease_names)
        results[name].update(dataset_scores(trainer.config, name, targets, probabilities))
    return results, predictions["test"]


def final_report(trainer: Trainer, splits, run_dir: Path, best: dict, best_model: dict | None) -> dict:
    if best_model is not None:
        trainer.model.load_state_dict(best_model)
    else:
        logger.warning("no checkpoint was eligible as best; reporting the last model")
    results, test_predictions = evaluate_splits(trainer, splits)
    results["best"] = best
    if not current_context().is_main:
        return results
    with local_only():  # localisation and figures: rank 0 alone, no collectives
        localisation = localisation_report(trainer.model, splits.test, trainer.config, trainer.device, trainer.progress)
        if localisation is not None:
            results["localisation"] = localisation
        atomic_write_json(run_dir / "results.json", json_safe(results))
        logger.info("best model (%s): val mean AUC %.4f, test mean AUC %.4f",
                    best.get("stage"), results["val"]["mean_auc"], results["test"]["mean_auc"])
        logger.info("wrote %s", run_dir / "results.json")
        write_report_plots(*test_predictions, splits.test.disease_names, run_dir, run_dir / "metrics.csv")
    return results


def evaluate_checkpoint(checkpoint: str, args: argparse.Namespace, progress: bool = True) -> Path:
    state = load_checkpoint(checkpoint)
    config = config_for_resume(state, args, training=False)
    run_dir = Path(config_overrides(args).get("out_dir") or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    context = current_context()
    splits = build_datasets_once_per_node(config, context)
    model = build_model(config, load_pretrained=False)
    check_compatible(state, model)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir / "log.txt")
    trainer = Trainer(config, model, splits, resolve_device(config.device, context), progress=progress)
    trainer.model.load_state_dict(state["model"])
    results, test_predictions = evaluate_splits(trainer, splits)
    results["checkpoint"] = str(Path(checkpoint).resolve())
    if not context.is_main:
        return run_dir
    with local_only():  # localisation and figures: rank 0 alone, no collectives
        localisation = localisation_report(trainer.model, splits.test, config, trainer.device, progress)
        if localisation is not None:
            results["localisation"] = localisation
        atomic_write_json(run_dir / "results.json", json_safe(results))
        logger.info("val mean AUC %.4f, test mean AUC %.4f; wrote %s",
                    results["val"]["mean_auc"], results["test"]["mean_auc"], run_dir / "results.json")
        write_report_plots(*test_predictions, splits.test.disease_names, run_dir,
                           Path(state["path"]).resolve().parent.parent / "metrics.csv")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    context = init_distributed_mode(config_overrides(args).get("device", "auto"))
    setup_logging()
    if not context.is_main:  # under torchrun only rank 0 reports progress
        logging.getLogger().setLevel(logging.WARNING)
    progress = not args.no_progress
    try:
        if args.eval_only:
            if not args.checkpoint:
                raise ValueError("--eval-only needs --checkpoint PATH")
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
