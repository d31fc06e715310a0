"""TensorBoard event files: the expected tags at the expected steps, and a resumed run that continues
them without overlap, also after an interrupted job left events its checkpoint does not cover."""
from __future__ import annotations

import csv
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import main
from utils.checkpoint import load_checkpoint
from utils.dry_run import stage_plan
from utils.tensorboard_log import push_summary
from utils.training import build_schedule

DISEASES = ["Atelectasis", "Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumothorax"]
CLASSES = DISEASES + ["No Finding"]


def read_events(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()  # applies the purge a resumed writer records
    return events


def steps(events, tag) -> list[int]:
    return [event.step for event in events.Scalars(tag)]


def test_push_summary_from_provenance_records():
    records = [
        dict(prototype=0, class_index=0, class_name="A", image_index=4, distance=1.0, reused_image=False),
        dict(prototype=1, class_index=0, class_name="A", image_index=7, distance=3.0, reused_image=False),
        dict(prototype=2, class_index=1, class_name="B", image_index=7, distance=0.5, reused_image=True),
        dict(prototype=3, class_index=1, class_name="B", image_index=-1, distance=float("nan"), reused_image=False),
        dict(prototype=4, class_index=2, class_name="No Finding", image_index=-1, distance=float("nan"), reused_image=False),
    ]
    assert push_summary(records, ["A", "B", "No Finding"]) == {
        "pushed_prototypes": 3.0, "distinct_source_images": 2.0, "reused_images": 1.0,
        "distinct_source_images/A": 2.0, "mean_distance/A": 2.0,
        "distinct_source_images/B": 1.0, "mean_distance/B": 0.5,
        "distinct_source_images/No Finding": 0.0,
    }


def test_push_summary_reports_the_unused_share_where_the_push_counted_it():
    records = [
        dict(prototype=j, class_index=j // 4, class_name="AB"[j // 4], image_index=j, distance=0.1, reused_image=False,
             nearest_before_push=count)
        for j, count in enumerate([0, 0, 0, 9, 5, 0, 2, 1])
    ]
    summary = push_summary(records, ["A", "B"])
    assert summary["unused_before_push/A"] == 0.75 and summary["unused_before_push/B"] == 0.25
    for record in records:
        del record["nearest_before_push"]  # a checkpoint from before the count: no such figure
    assert not any(key.startswith("unused_before_push/") for key in push_summary(records, ["A", "B"]))


def test_event_files_hold_every_tag_and_a_resume_continues_without_overlap(config_factory):
    config = config_factory(tensorboard=True, log_every=3)
    # Stages of the tiny schedule and their optimizer steps (16 anchors; warm-up 8 images per step,
    # paired and last-layer 4 pairs per step), a push taking one step of its own:
    #   warmup0 2 | paired1 4 | paired2 4 | push 1 | last_layer 4 | paired3 4 | push 1 | last_layer 4
    stage_ends = [2, 6, 10, 11, 15, 19, 20, 24]
    # Every 3 steps within a training stage, and a last, shorter window at its end.
    running_means = [2, 5, 6, 9, 10, 14, 15, 18, 19, 23, 24]
    schedule = build_schedule(config)
    plan = stage_plan(config, config.synthetic_train_size)
    assert [sum(s.steps + (s.kind == "push") for s in plan[: i + 1]) for i in range(len(plan))] == stage_ends

    run_dir = main.train(config_factory(tensorboard=True, log_every=3, max_stages=4), progress=False)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    assert load_checkpoint(checkpoint)["global_step"] == 11  # after the first push
    # What a job killed before its next checkpoint leaves behind: events after step 11.
    stale = SummaryWriter(str(run_dir / "tensorboard"))
    for step in (13, 15):
        stale.add_scalar("train/loss", -1.0, step)
    stale.add_scalar("val/mean_auc", -1.0, 15)
    stale.close()
    assert steps(read_events(run_dir), "val/mean_auc") == stage_ends[:4] + [15]
    state = load_checkpoint(checkpoint)
    main.train(main.config_for_resume(state, main.parse_args([])), resume_state=state, progress=False)

    events = read_events(run_dir)
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 3  # two runs and the stale writer
    terms = ["classification", "cluster", "separation", "cross_image", "interpretation", "prediction", "loss"]
    groups = ["backbone", "add_on", "prototypes", "last_layer"]
    if config.weight_local_reconstruction > 0:  # the synthetic preset's L_rec and its decoder
        terms, groups = terms + ["local_reconstruction"], groups + ["local_decoder"]
    expected = (
        {f"train/{term}" for term in terms} | {f"stage/{term}" for term in terms}
        | {f"lr/{group}" for group in groups}
        | {"val/mean_auc"} | {f"val/auc/{name}" for name in DISEASES}
        | {"push/pushed_prototypes", "push/distinct_source_images", "push/reused_images"}
        | {f"push/distinct_source_images/{name}" for name in CLASSES} | {f"push/mean_distance/{name}" for name in CLASSES}
        | {f"push/unused_before_push/{name}" for name in CLASSES}
        | {"test/mean_auc"} | {f"test/auc/{name}" for name in DISEASES}
        | {"test_decorrelated/mean_auc"} | {f"test_decorrelated/auc/{name}" for name in DISEASES}
        | {f"{split}/localisation/{method}/{key}" for split in ("test", "test_decorrelated")
           for method in ("cipl", "gradcam") for key in ("pointing", "iobb_0.5", "mean_iou")}
    )
    # Prototype quality after each push and in the final report; which per-class figures exist depends on
    # the data (grounding needs a boxed source image), the overall ones are always there.
    quality = {tag for tag in scalars if tag.startswith(("push/quality/", "test/prototypes/"))}
    for prefix in ("push/quality", "test/prototypes"):
        assert {f"{prefix}/{key}" for key in ("collapsed_classes", "largest_location_share", "grounded")} <= quality
    assert "test/prototypes/selectivity" in quality and "push/quality/selectivity" not in quality
    assert steps(events, "push/quality/collapsed_classes") == [11, 20]
    assert scalars - quality == expected
    assert images == {f"push/gallery/{name}" for name in CLASSES} | {"test/roc"}

    # Every step once: the stale events after step 11 were dropped, the resumed run wrote its own.
    assert steps(events, "val/mean_auc") == stage_ends
    assert steps(events, "lr/backbone") == stage_ends
    assert steps(events, "train/loss") == running_means
    assert -1.0 not in [event.value for tag in ("train/loss", "val/mean_auc") for event in events.Scalars(tag)]
    assert steps(events, "train/cross_image") == running_means[1:]  # no cross-image term in warm-up
    if config.weight_local_reconstruction > 0:
        assert steps(events, "train/local_reconstruction") == running_means[:1]  # warm-up only
    assert steps(events, "stage/loss") == [end for end, stage in zip(stage_ends, schedule) if stage.kind != "push"]
    assert steps(events, "push/pushed_prototypes") == [11, 20]
    assert [event.step for event in events.Images("push/gallery/Effusion")] == [11, 20]
    assert steps(events, "test/mean_auc") == [24]
    assert [event.step for event in events.Images("test/roc")] == [24]
    gallery = events.Images("push/gallery/Effusion")[0]
    assert gallery.width > 200 and gallery.height > 100
    assert [event.value for event in events.Scalars("push/pushed_prototypes")] == [14.0, 14.0]

    # The curves agree with metrics.csv, which shows the rates each stage trained with.
    with (run_dir / "metrics.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [event.value for event in events.Scalars("val/mean_auc")] == pytest.approx(
        [float(row["val_mean_auc"]) for row in rows], rel=1e-6)
    assert [event.value for event in events.Scalars("lr/backbone")] == pytest.approx(
        [float(row["lr_backbone"]) for row in rows], rel=1e-6)
    assert [event.value for event in events.Scalars("test/mean_auc")] == pytest.approx(
        [json.loads((run_dir / "results.json").read_text())["test"]["mean_auc"]], rel=1e-6)
