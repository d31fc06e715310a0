"""Ground a checkpoint's prototypes on training patches and draw them (METHOD.md "Push").

    python push.py --checkpoint RUN/checkpoints/best.pt                   # push, save best_pushed.pt, draw
    python push.py --checkpoint RUN/checkpoints/best.pt --visualise-only  # draw the prototypes it holds

The push is the one main.py runs at push epochs (utils.projection.push_prototypes) over the training
split rebuilt from the checkpoint's own configuration. The pushed model is saved next to the input as
<name>_pushed.pt (the input is never overwritten). The output folder (default RUN/prototypes/<name>)
receives, all at once when everything has been drawn:

    prototypes.json                      per prototype: class, source image, feature-map location,
                                         image-space high-activation box, distance and similarity,
                                         the source image's ground-truth boxes of the class (if any);
                                         "quality": the prototype-quality section of results.json
                                         (diversity, grounding, selectivity on the test split)
    gallery/<class>.png                  one grid per class: source image with overlay | patch
    prototypes/p<j>-<class>-source.png   source image, 0.7 image + 0.3 jet similarity overlay,
                                         white 0.65 contour, yellow high-activation box, magenta
                                         ground-truth boxes of the prototype's class
    prototypes/p<j>-<class>-patch.png    the high-activation patch (95th percentile, component of the max)
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

from datasets import EvalTransform, TransformedDataset, build_datasets
from utils.checkpoint import CheckpointError, atomic_write_json, save_checkpoint
from utils.cli import run_script
from utils.projection import provenance_records, push_prototypes
from utils.prototype_quality import (evaluate_prototype_quality, format_quality, prototype_grounding,
                                     warn_if_collapsed)
from utils.training import predict, resolve_device
from utils.visualise import (
    GalleryEntry, check_output_dir, gallery_figure, iter_prototype_views, load_model_from_checkpoint, save_png,
    staged_output,
)

logger = logging.getLogger("cipl.push")

MARKER = "prototypes.json"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Project a CIPL checkpoint's prototypes onto their nearest training patches (the push of\n"
                    "METHOD.md) and render them: per prototype its source image with the similarity overlay,\n"
                    "contour and high-activation box, and its patch; per class a gallery; prototypes.json.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="a CIPL checkpoint (.pt) or a run directory (uses its last.pt)")
    parser.add_argument("--out", default="", help="output folder (default: RUN/prototypes/<checkpoint name> for "
                        "RUN/checkpoints/*.pt, else <checkpoint name>_prototypes next to it)")
    parser.add_argument("--visualise-only", action="store_true",
                        help="do not push: render the prototypes the (already pushed) checkpoint holds")
    parser.add_argument("--data-root", default="", help="dataset folder, if it moved since training")
    parser.add_argument("--device", default="", help="auto, cpu, cuda or cuda:N (default: the run's setting)")
    parser.add_argument("--batch-size", type=int, default=0, help="images per batch (default: the run's eval batch size)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "class"


def default_out_dir(checkpoint: Path) -> Path:
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "prototypes" / checkpoint.stem
    return checkpoint.parent / f"{checkpoint.stem}_prototypes"


def pushed_checkpoint_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}_pushed{checkpoint.suffix or '.pt'}")


def check_provenance(state: dict, image_ids: list[str]) -> None:
    """The training split rebuilt now must be the one the prototypes were pushed onto."""
    for record in state.get("prototype_provenance") or []:
        index, expected = record.get("image_index", -1), record.get("image_id")
        if index is None or index < 0 or expected is None:
            continue
        if index >= len(image_ids) or image_ids[index] != expected:
            found = image_ids[index] if index < len(image_ids) else "nothing"
            raise CheckpointError(
                f"prototype {record.get('prototype')} was pushed onto training image {expected!r}, but index {index} "
                f"of the training split is now {found}: the data differs from the run's (check --data-root)"
            )


def run(args: argparse.Namespace) -> Path:
    """Push (unless --visualise-only) and render; returns the output folder."""
    progress = not args.no_progress
    state, config, model = load_model_from_checkpoint(args.checkpoint, device=args.device, data_root=args.data_root)
    checkpoint = Path(state["path"])
    out = Path(args.out) if args.out else default_out_dir(checkpoint)
    check_output_dir(out, MARKER)
    if args.batch_size < 0:
        raise ValueError("--batch-size must be positive")
    batch_size = args.batch_size or config.eval_batch_size
    if args.visualise_only and not model.is_pushed:
        unpushed = int((model.prototype_source_index < 0).sum())
        raise CheckpointError(f"{checkpoint} holds {unpushed} prototypes that were never pushed: "
                              f"run push.py without --visualise-only")
    splits = build_datasets(config)
    train = splits.train
    device = resolve_device(config.device)

    if args.visualise_only:
        check_provenance(state, train.image_ids)
        provenance = state.get("prototype_provenance") or []
        complete = len(provenance) == model.num_prototypes
        reused = [bool(record.get("reused_image", False)) for record in provenance]
        nearest = [record.get("nearest_before_push") for record in provenance]
        capped = complete and all("moved_by_cell_cap" in record for record in provenance)
        cell_cap = SimpleNamespace(moved_by_cell_cap=[record["moved_by_cell_cap"] for record in provenance],
                                   distance_given_up=[record["distance_given_up"] for record in provenance]) if capped else None
        records = provenance_records(model, train.image_ids, reused if complete else None,
                                     nearest if complete and None not in nearest else None, cell_cap)
        target = None
    else:
        if model.is_pushed:
            logger.info("the checkpoint is already pushed; pushing again with its current prototypes")
        push_set = TransformedDataset(train, EvalTransform(config.image_size))
        records = push_prototypes(model, push_set, device, batch_size=batch_size, num_workers=config.num_workers,
                                  progress=progress, image_ids=train.image_ids,
                                  max_cell_share=config.push_max_cell_share)
        target = pushed_checkpoint_path(checkpoint)
    grounding = prototype_grounding(model, train, config.image_size, device, batch_size)
    if not args.visualise_only:
        warn_if_collapsed(model, train.image_ids, grounding)
    # Selectivity on the held-out test split; diversity and grounding from the training split pushed onto.
    _, _, test_scores = predict(model, splits.test, device, config.image_size, batch_size, config.num_workers,
                                progress, with_scores=True)
    quality = evaluate_prototype_quality(model, train, config.image_size, device, batch_size, test_scores,
                                         splits.test.targets, grounding, provenance=records)
    logger.info("prototype quality (selectivity on the test split):\n%s", format_quality(quality))

    with staged_output(out, MARKER) as staging:
        (staging / "prototypes").mkdir()
        (staging / "gallery").mkdir()
        entries = {record["prototype"]: dict(record, location=list(record["location"]), box=None, truth_boxes=None,
                                             source_image_size=None, similarity=None, files=None) for record in records}
        flagged = quality["overall"].get("unselective_prototypes")  # None where the test split gave no selectivity
        unselective = set(flagged or ())
        for record in entries.values():
            record["unselective"] = record["prototype"] in unselective
        gallery: dict[int, list[GalleryEntry]] = {c: [] for c in range(model.num_classes)}
        views = iter_prototype_views(model, train, config.image_size, batch_size=min(batch_size, 16))
        pushed = int((model.prototype_source_index >= 0).sum())
        for view in tqdm(views, total=pushed, desc="draw prototypes", leave=False, disable=not progress):
            stem = f"p{view.prototype:04d}-{slug(view.class_name)}"
            save_png(staging / "prototypes" / f"{stem}-source.png", view.picture)
            save_png(staging / "prototypes" / f"{stem}-patch.png", view.patch)
            x, y, w, h = view.box
            entries[view.prototype].update(
                box=dict(x=x, y=y, w=w, h=h),
                truth_boxes=[dict(x=tx, y=ty, w=tw, h=th) for tx, ty, tw, th in view.truth_boxes],
                source_image_size=list(view.image.shape[:2]),
                similarity=view.similarity,
                files=dict(source=f"prototypes/{stem}-source.png", patch=f"prototypes/{stem}-patch.png"),
            )
            gallery[view.class_index].append(GalleryEntry.of(view))
        for class_index, class_name in enumerate(model.class_names):
            gallery_figure(class_name, gallery[class_index], staging / "gallery" / f"{slug(class_name)}.png",
                           unselective=unselective)
        atomic_write_json(staging / MARKER, dict(
            checkpoint=str(checkpoint.resolve()),
            pushed_checkpoint=str(target.resolve()) if target is not None else None,
            visualise_only=bool(args.visualise_only),
            class_names=model.class_names,
            image_size=config.image_size,
            prototype_dim=model.prototype_dim,
            quality=_json_numbers(quality),
            box="high-activation box (x, y, w, h) in source-image pixels: 95th percentile of the upsampled "
                "similarity map, connected component holding its maximum",
            truth_boxes="the source image's ground-truth boxes of the prototype's class (x, y, w, h), in the "
                        "same frame (empty where the training split has none)",
            prototypes=_json_numbers([entries[j] for j in sorted(entries)]),
        ))
        if target is not None:
            pushed_state = {key: value for key, value in state.items() if key != "path"}
            pushed_state.update(model=model.state_dict(), prototype_provenance=records, pushed_from=str(checkpoint.resolve()),
                                unselective_prototypes=flagged)
            save_checkpoint(target, pushed_state)
            logger.info("saved the pushed model to %s", target)
    logger.info("wrote %d prototype pictures and %d galleries to %s", pushed, model.num_classes, out)
    return out


def _json_numbers(value):
    """NaN / inf -> None, numpy scalars -> Python, so prototypes.json is strict JSON."""
    if isinstance(value, dict):
        return {key: _json_numbers(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_numbers(item) for item in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def main(argv: list[str] | None = None) -> int:
    return run_script("push.py", get_args_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
