"""experiments/ablation.py: the statistics against hand-computed values, the runs it launches, and the
table written from a tree of finished runs."""
import json
import math
import subprocess
import threading
from pathlib import Path

import pytest

import main
from experiments import ablation, gradient_share


def test_mean_and_std_skip_missing_values():
    mean, std, count = ablation.mean_and_std([0.5, None, 0.7, float("nan"), 0.9])
    assert count == 3 and mean == pytest.approx(0.7) and std == pytest.approx(0.2)
    assert ablation.mean_and_std([0.4]) == (0.4, 0.0, 1)
    assert math.isnan(ablation.mean_and_std([None])[0])


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    reference = [0.80, 0.70, 0.60]
    variant = [0.90, 0.90, 0.90]  # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1
    mean, low, high, pairs = ablation.paired_difference(variant, reference)
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert pairs == 3 and mean == pytest.approx(0.2)
    assert low == pytest.approx(0.2 - half, abs=1e-6) and high == pytest.approx(0.2 + half, abs=1e-6)
    # Only seeds where both runs have the figure are paired; one pair has no interval.
    mean, low, high, pairs = ablation.paired_difference([0.5, None], [0.4, 0.3])
    assert pairs == 1 and mean == pytest.approx(0.1) and low == -math.inf and high == math.inf


def fake_results(test_auc: float, decorrelated_auc: float, pointing: float) -> dict:
    auc = {name: test_auc for name in ("Atelectasis", "Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumothorax")}
    localisation = {"methods": {"cipl": {"mean": {"pointing": pointing}}, "gradcam": {"mean": {"pointing": 0.1}}}}
    return {
        "val": {"mean_auc": test_auc - 0.01, "auc": auc},
        "test": {"mean_auc": test_auc, "auc": auc},
        "test_decorrelated": {"mean_auc": decorrelated_auc, "auc": dict(auc, Mass=decorrelated_auc),
                              "localisation": localisation},
        "localisation": localisation,
        "prototypes": {"overall": {"grounded": 0.5, "at_lesion": 0.6, "on_other_lesion": 0.2, "selectivity": 0.1,
                                   "largest_location_share": 0.25, "unselective_prototypes": [3, 17],
                                   "centre_cell_grounded": 0.8}},
    }


def test_run_metrics_read_every_figure_of_the_table():
    metrics = ablation.run_metrics(fake_results(0.8, 0.7, 0.6))
    assert metrics["test_auc"] == 0.8 and metrics["decorrelated_auc"] == 0.7
    assert metrics["test_pointing_cipl"] == 0.6 and metrics["decorrelated_pointing_gradcam"] == 0.1
    assert metrics["decorrelated_pairs_auc"] == pytest.approx((0.8 * 3 + 0.7) / 4)  # Mass is one of the pairs
    assert metrics["grounded"] == 0.5 and metrics["selectivity"] == 0.1 and metrics["on_other_lesion"] == 0.2
    assert metrics["unselective"] == 2 and metrics["centre_cell_grounded"] == 0.8
    older = ablation.run_metrics({"test": {"mean_auc": 0.5, "auc": {}}})  # a run scored before these figures
    assert older["test_pointing_cipl"] is None and older["unselective"] is None


def test_peak_distance_averages_each_class_offset_length():
    # Two classes shifted in opposite directions: their signed offsets cancel, their distances do not.
    # A class whose peak was never located (nan) does not count; no per-class offsets, no figure.
    per_class = {"Mass": {"peak_offset_y": -6.0, "peak_offset_x": 8.0},
                 "Nodule": {"peak_offset_y": 3.0, "peak_offset_x": -4.0},
                 "Effusion": {"peak_offset_y": float("nan"), "peak_offset_x": float("nan")}}
    results = fake_results(0.8, 0.7, 0.6)
    results["localisation"]["methods"]["cipl"]["per_class"] = per_class
    assert ablation.run_metrics(results)["test_peak_distance_cipl"] == pytest.approx(7.5)
    assert ablation.run_metrics(fake_results(0.8, 0.7, 0.6))["test_peak_distance_cipl"] is None


def test_table_from_finished_runs(tmp_path, capsys):
    values = {"full": [(0.80, 0.75, 0.6), (0.82, 0.74, 0.7), (0.81, 0.76, 0.6)],
              "none": [(0.78, 0.70, 0.4), (0.79, 0.70, 0.5), (0.80, 0.73, 0.5)]}
    for variant, runs in values.items():
        for seed, figures in enumerate(runs):
            directory = ablation.run_directory(tmp_path, variant, seed)
            directory.mkdir(parents=True)
            (directory / "results.json").write_text(json.dumps(fake_results(*figures)))
    code = ablation.main(["--seeds", "0", "1", "2", "--variants", "full", "none", "--out", str(tmp_path),
                          "--table-only", "--no-progress"])
    assert code == 0
    text = (tmp_path / "ablation.md").read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    assert "| test: mean AUC | 0.810 ± 0.010 | 0.790 ± 0.010 |" in text
    # none - full on the decorrelated AUC: -0.05, -0.04, -0.03 -> mean -0.04 +- 4.30 * 0.01 / sqrt(3).
    summary = json.loads((tmp_path / "ablation.json").read_text())
    entry = summary["metrics"]["decorrelated_auc"]["none"]
    assert entry["difference"] == pytest.approx(-0.04)
    assert entry["difference_low"] == pytest.approx(-0.04 - 0.02484, abs=1e-4) and entry["difference_high"] < 0
    assert "| decorrelated test: mean AUC | -0.040 [" in text and "] * |" in text.split("decorrelated test: mean AUC | -0.040")[1].splitlines()[0]
    assert (tmp_path / "ablation.csv").read_text().count("\n") == 7  # header + 6 runs
    assert "gradient" not in text  # full wins on the decorrelated split: nothing to explain


def finished_process(returncode: int = 0, stderr: str = "") -> subprocess.CompletedProcess:
    """What subprocess.run returns for a main.py run (its output is not captured, only stderr)."""
    return subprocess.CompletedProcess(args=[], returncode=returncode, stdout=None, stderr=stderr)


def test_each_run_is_a_main_py_process_resumed_or_reused(tmp_path, monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        out = command[command.index("--out-dir") + 1] if "--out-dir" in command else command[command.index("--resume") + 1]
        (tmp_path / "done").write_text(out)
        return finished_process()

    monkeypatch.setattr(ablation.subprocess, "run", fake_run)
    ablation.run_one(tmp_path, "no-alignment", 3, ["--epochs", "5"], progress=False)
    command = calls[-1]
    assert command[1:] == ["main.py", "--seed", "3", "--out-dir", str(tmp_path / "no-alignment" / "seed-3"),
                           "--no-interpretation-alignment", "--no-prediction-alignment", "--epochs", "5", "--no-progress"]
    interrupted = tmp_path / "full" / "seed-0" / "checkpoints"
    interrupted.mkdir(parents=True)
    (interrupted / "last.pt").write_bytes(b"")
    ablation.run_one(tmp_path, "full", 0, ["--epochs", "5"], progress=False)
    assert calls[-1][1:] == ["main.py", "--resume", str(tmp_path / "full" / "seed-0"), "--no-progress"]
    (tmp_path / "full" / "seed-0" / "results.json").write_text("{}")
    ablation.run_one(tmp_path, "full", 0, [], progress=False)
    assert len(calls) == 2  # a finished run is reused, not run again

    def failing_run(command, **kwargs):
        return finished_process(2, "Traceback ...\nERROR cipl: --epochs 0 must be a positive whole number")

    monkeypatch.setattr(ablation.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match="none seed 1 failed .*--epochs 0 must be"):
        ablation.run_one(tmp_path, "none", 1, ["--epochs", "0"], progress=False)


def _recording_run(seen: list, failing: tuple[str, str] | None = None):
    """A fake subprocess.run for main.py: records (variant, seed folder, OMP_NUM_THREADS) and finishes
    the run, except the `failing` one."""
    def fake_run(command, env=None, **kwargs):
        out = Path(command[command.index("--out-dir") + 1])
        seen.append((out.parent.name, out.name, None if env is None else env.get("OMP_NUM_THREADS")))
        if (out.parent.name, out.name) == failing:
            return finished_process(1, "ERROR cipl: out of memory")
        (out / "results.json").write_text("{}")
        return finished_process()
    return fake_run


def test_parallel_runs_share_the_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(ablation, "_available_cores", lambda: 8)
    seen = []
    monkeypatch.setattr(ablation.subprocess, "run", _recording_run(seen))
    runs = [(variant, seed) for seed in (0, 1) for variant in ("full", "none")]
    assert ablation.run_all(tmp_path / "four", runs, [], jobs=4, progress=False) == []
    assert sorted(seen) == [("full", "seed-0", "2"), ("full", "seed-1", "2"), ("none", "seed-0", "2"), ("none", "seed-1", "2")]
    seen.clear()
    ablation.run_all(tmp_path / "more-jobs-than-runs", runs, [], jobs=20, progress=False)
    assert {threads for *_, threads in seen} == {"2"}  # 4 runs at once, not 20
    seen.clear()
    ablation.run_all(tmp_path / "serial", runs, [], jobs=1, progress=False)
    assert {threads for *_, threads in seen} == {None}  # one at a time: the process's own environment
    seen.clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    ablation.run_all(tmp_path / "caller-set", runs, [], jobs=4, progress=False)
    assert {threads for *_, threads in seen} == {None}  # inherits the caller's 3 threads unchanged
    assert json.loads((tmp_path / "caller-set" / "full" / "seed-0" / ablation.RUN_RECORD).read_text())["threads"] == "3"


def test_a_failed_run_does_not_stop_the_others_and_every_failure_is_reported(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(ablation.subprocess, "run", _recording_run(seen, failing=("none", "seed-0")))
    runs = [("none", 0), ("full", 0), ("full", 1)]
    failures = ablation.run_all(tmp_path, runs, [], jobs=1, progress=False)
    assert len(failures) == 1 and "none seed 0 failed" in failures[0] and "out of memory" in failures[0]
    assert (tmp_path / "full" / "seed-0" / "results.json").exists() and (tmp_path / "full" / "seed-1" / "results.json").exists()
    broken = tmp_path / "no-cross" / "seed-0"
    broken.mkdir(parents=True)
    (broken / ablation.RUN_RECORD).write_text("{not json")
    failures = ablation.run_all(tmp_path, [("no-cross", 0), ("none", 1)], [], jobs=1, progress=False)
    assert len(failures) == 1 and failures[0].startswith("no-cross seed 0: JSONDecodeError")
    assert (tmp_path / "none" / "seed-1" / "results.json").exists()


def test_an_interrupt_cancels_the_runs_not_yet_started(tmp_path, monkeypatch):
    started, release = [], threading.Event()

    def blocking_run(out, variant, seed, *args):
        started.append((variant, seed))
        release.wait(10)  # still running when Ctrl-C arrives

    def ctrl_c(futures):  # Ctrl-C reaches the main thread while it waits for the runs
        threading.Timer(0.2, release.set).start()  # the running one then ends, as main.py does on SIGINT
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(ablation, "run_one", blocking_run)
    monkeypatch.setattr(ablation, "as_completed", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        ablation.run_all(tmp_path, [("full", 0), ("full", 1), ("none", 0)], [], jobs=1, progress=False)
    assert started in ([], [("full", 0)])  # the queued runs never start


def test_repeated_variants_or_jobs_below_one_are_refused(tmp_path, capsys):
    assert ablation.main(["--variants", "full", "full", "--out", str(tmp_path)]) == 2
    assert "--variants repeats a variant" in capsys.readouterr().err
    assert ablation.main(["--jobs", "0", "--out", str(tmp_path)]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_a_run_directory_is_only_reused_with_the_options_it_was_started_with(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(ablation.subprocess, "run", lambda command, **kwargs: finished_process())
    ablation.run_one(tmp_path, "no-cross", 0, ["--epochs", "5"], progress=False)
    record = json.loads((tmp_path / "no-cross" / "seed-0" / ablation.RUN_RECORD).read_text())
    assert record == dict(variant="no-cross", seed=0, options=["--no-cross-image", "--epochs", "5"], threads="all")
    (tmp_path / "no-cross" / "seed-0" / "results.json").write_text("{}")
    with caplog.at_level("WARNING", logger="cipl.ablation"):
        ablation.run_one(tmp_path, "no-cross", 0, ["--epochs", "5"], progress=False)  # same options: reused
        assert not caplog.records
        ablation.run_one(tmp_path, "no-cross", 0, ["--epochs", "5"], progress=False, environment={"OMP_NUM_THREADS": "1"})
        assert "started with all threads, now 1" in caplog.text  # reused, but the thread count is flagged
    with pytest.raises(RuntimeError, match="was run with other main.py options .*--epochs 5"):
        ablation.run_one(tmp_path, "no-cross", 0, ["--epochs", "20"], progress=False)


def write_runs(out, values: dict) -> None:
    for variant, runs in values.items():
        for seed, figures in runs.items():
            directory = ablation.run_directory(out, variant, seed)
            directory.mkdir(parents=True)
            (directory / "results.json").write_text(json.dumps(fake_results(*figures)))


def test_when_full_loses_on_the_decorrelated_split_the_table_gives_gradient_shares(tmp_path, monkeypatch, capsys):
    write_runs(tmp_path, {"full": {0: (0.80, 0.70, 0.6), 1: (0.81, 0.71, 0.6)},
                          "none": {0: (0.80, 0.74, 0.5), 1: (0.80, 0.72, 0.5)}})
    measured = []

    def fake_shares(run_dir):
        measured.append(Path(run_dir))
        return {"classification": 0.7, "cross_image": 0.3}

    monkeypatch.setattr(ablation, "measure_gradient_shares", fake_shares)
    monkeypatch.setattr(ablation, "format_shares", lambda shares: f"SHARES OF {len(shares)} RUNS")
    assert ablation.main(["--seeds", "0", "1", "--variants", "full", "none", "--out", str(tmp_path),
                          "--table-only", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert measured == [tmp_path.resolve() / "full" / "seed-0", tmp_path.resolve() / "full" / "seed-1"]
    assert "does not beat every variant on the decorrelated split" in text and "SHARES OF 2 RUNS" in text
    assert json.loads((tmp_path / "ablation.json").read_text())["gradient_shares"][0]["cross_image"] == 0.3


def test_a_cell_says_how_many_runs_it_holds_when_seeds_are_missing(tmp_path, capsys):
    write_runs(tmp_path, {"full": {0: (0.80, 0.75, 0.6), 1: (0.82, 0.76, 0.6), 2: (0.81, 0.76, 0.6)},
                          "none": {0: (0.78, 0.70, 0.4), 2: (0.80, 0.71, 0.5)}, "no-cross": {1: (0.7, 0.7, 0.5)}})
    assert ablation.main(["--seeds", "0", "1", "2", "--variants", "full", "none", "no-cross", "--out", str(tmp_path),
                          "--table-only", "--no-progress", "--no-gradient-share"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("| test: mean AUC |"))
    assert line == "| test: mean AUC | 0.810 ± 0.010 | 0.790 ± 0.014 (2 runs) | 0.700 (1 run) |"


def test_gradient_shares_sum_to_one_and_a_zero_weight_sends_no_gradient(config_factory):
    run_dir = main.train(config_factory(max_stages=2, weight_cross_image=0.0), progress=False)  # warm-up + paired
    shares = gradient_share.measure_gradient_shares(run_dir, batches=2)
    share = dict(zip(shares["terms"], shares["share"]))
    cosine = dict(zip(shares["terms"], shares["cosine_with_classification"]))
    assert shares["batches"] == 2 and sum(share.values()) == pytest.approx(1.0)
    assert share["cross_image"] == 0.0 and share["classification"] > 0 and cosine["classification"] == pytest.approx(1.0)
    assert "| classification |" in gradient_share.format_shares([shares, shares])
