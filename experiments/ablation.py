"""CIPL's terms over several seeds: one command runs the ablation and writes the table.

    python -m experiments.ablation --seeds 0 1 2 --variants full no-cross no-alignment none
    python -m experiments.ablation --out runs/ablation --table-only        # re-read finished runs
    python -m experiments.ablation --seeds 0 1 2 -- --samples-per-epoch 2400  # extra main.py options
    python -m experiments.ablation --seeds 0 1 2 3 4 --jobs 20             # 20 runs at once (a GPU)

Every (variant, seed) is an ordinary ``main.py`` run in its own process, in
``OUT/<variant>/seed-<seed>``; a finished run (results.json present) is reused and an interrupted one
is resumed, so the command can be stopped and started again. The variants of one seed share the
seed, hence the data (the synthetic set is drawn from --seed) and the initial weights, so each
variant's difference to ``full`` is measured on matched pairs.

The table (``OUT/ablation.md``, also printed; per-run figures in ``OUT/ablation.csv``, everything in
``OUT/ablation.json``) gives every figure as mean +- standard deviation over seeds and, for every
variant, its paired difference to ``full`` with a 95% t-interval over seeds. With 3 seeds the
interval is wide: that is the honest size of what 3 seeds can show. When the data has a decorrelated
test split (the synthetic preset's ``test_decorrelated``), its figures are reported too. When full
CIPL does not beat a variant on that split, the share of the gradient each loss term sends to the
features (experiments/gradient_share.py) is measured on the full runs and appended.

A run of one seed is reproducible on the machine and thread count it ran on; other machines or
thread counts give other numbers (floating-point reductions run in another order).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from scipy import stats
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from experiments.gradient_share import format_shares, measure_gradient_shares
from utils.checkpoint import atomic_write_json, atomic_write_text
from utils.localisation import peak_distance
from utils.synthetic import CO_OCCURRING_DISEASES

logger = logging.getLogger("cipl.ablation")

ROOT = Path(__file__).resolve().parent.parent

VARIANTS: dict[str, tuple[str, ...]] = {
    "full": (),
    "no-cross": ("--no-cross-image",),
    "no-interpretation": ("--no-interpretation-alignment",),
    "no-prediction": ("--no-prediction-alignment",),
    "no-alignment": ("--no-interpretation-alignment", "--no-prediction-alignment"),
    "none": ("--no-cross-image", "--no-interpretation-alignment", "--no-prediction-alignment"),
}
REFERENCE = "full"
RUN_RECORD = "ablation-run.json"  # the variant, seed, main.py options and thread count a run was started with


def _co_occurring_auc(split: dict | None) -> float | None:
    """Mean AUC over the diseases of the synthetic set's co-occurring pairs, where present."""
    if not split:
        return None
    values = [split["auc"].get(name) for name in CO_OCCURRING_DISEASES]
    values = [value for value in values if value is not None]
    return float(np.mean(values)) if len(values) == len(CO_OCCURRING_DISEASES) else None


def _pointing(localisation: dict | None, method: str) -> float | None:
    if not localisation:
        return None
    return localisation["methods"].get(method, {}).get("mean", {}).get("pointing")


def _count(items: list | None) -> float | None:
    """How many there are; None for a run scored before the figure existed."""
    return None if items is None else float(len(items))


def run_metrics(results: dict) -> dict[str, float | None]:
    """The table's figures of one run, from its results.json."""
    test, decorrelated = results.get("test"), results.get("test_decorrelated")
    prototypes = (results.get("prototypes") or {}).get("overall", {})
    return {
        "test_auc": test["mean_auc"] if test else None,
        "test_pairs_auc": _co_occurring_auc(test),
        "test_pointing_cipl": _pointing(results.get("localisation"), "cipl"),
        "test_pointing_gradcam": _pointing(results.get("localisation"), "gradcam"),
        "test_peak_distance_cipl": peak_distance(results.get("localisation"), "cipl"),
        "decorrelated_auc": decorrelated["mean_auc"] if decorrelated else None,
        "decorrelated_pairs_auc": _co_occurring_auc(decorrelated),
        "decorrelated_pointing_cipl": _pointing((decorrelated or {}).get("localisation"), "cipl"),
        "decorrelated_pointing_gradcam": _pointing((decorrelated or {}).get("localisation"), "gradcam"),
        "grounded": prototypes.get("grounded"),
        "grounding_reachable": prototypes.get("grounding_reachable"),
        "centre_cell_grounded": prototypes.get("centre_cell_grounded"),
        "at_lesion": prototypes.get("at_lesion"),
        "on_other_lesion": prototypes.get("on_other_lesion"),
        "selectivity": prototypes.get("selectivity"),
        "largest_location_share": prototypes.get("largest_location_share"),
        "unselective": _count(prototypes.get("unselective_prototypes")),
        "val_auc": results.get("val", {}).get("mean_auc"),
    }


METRIC_TITLES = {
    "test_auc": "test: mean AUC",
    "test_pairs_auc": "test: mean AUC, co-occurring diseases",
    "test_pointing_cipl": "test: pointing game, CIPL map",
    "test_pointing_gradcam": "test: pointing game, Grad-CAM",
    "test_peak_distance_cipl": "test: CIPL evidence peak's distance from its lesion (px, mean over classes)",
    "decorrelated_auc": "decorrelated test: mean AUC",
    "decorrelated_pairs_auc": "decorrelated test: mean AUC, co-occurring diseases",
    "decorrelated_pointing_cipl": "decorrelated test: pointing game, CIPL map",
    "decorrelated_pointing_gradcam": "decorrelated test: pointing game, Grad-CAM",
    "grounded": "disease prototypes grounded (IoBB >= 0.5)",
    "grounding_reachable": "... whose lesion is large enough to be grounded at all",
    "centre_cell_grounded": "lesions a prototype on their centre cell would ground (what the features allow)",
    "at_lesion": "disease prototypes pushed onto a lesion cell",
    "on_other_lesion": "... onto another disease's lesion instead",
    "selectivity": "prototype selectivity (test)",
    "largest_location_share": "largest share of a class's prototypes on one cell",
    "unselective": "disease prototypes that match every image alike (selectivity < 0.05)",
    "val_auc": "validation: mean AUC (selection)",
}


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
def mean_and_std(values: list[float | None]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of the defined values, and their count."""
    defined = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(defined) == 0:
        return math.nan, math.nan, 0
    return float(defined.mean()), float(defined.std(ddof=1)) if len(defined) > 1 else 0.0, len(defined)


def paired_difference(variant: list[float | None], reference: list[float | None], confidence: float = 0.95
                      ) -> tuple[float, float, float, int]:
    """Mean of variant - reference over the seeds where both are defined, with its two-sided t-interval
    (n - 1 degrees of freedom): (mean, low, high, n). With one pair the interval is unbounded."""
    pairs = [(v, r) for v, r in zip(variant, reference)
             if v is not None and r is not None and not math.isnan(v) and not math.isnan(r)]
    if not pairs:
        return math.nan, math.nan, math.nan, 0
    differences = np.array([v - r for v, r in pairs], dtype=np.float64)
    mean = float(differences.mean())
    if len(differences) < 2:
        return mean, -math.inf, math.inf, 1
    half = float(stats.t.ppf(0.5 + confidence / 2, len(differences) - 1) * differences.std(ddof=1) / math.sqrt(len(differences)))
    return mean, mean - half, mean + half, len(differences)


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------
def run_directory(out: Path, variant: str, seed: int) -> Path:
    return out / variant / f"seed-{seed}"


def run_one(out: Path, variant: str, seed: int, extra: list[str], progress: bool,
            environment: dict[str, str] | None = None) -> Path:
    """Run (or resume, or reuse) one variant at one seed through main.py in its own process.

    environment: the process's environment variables (None: this process's own).
    """
    directory = run_directory(out, variant, seed)
    options = [*VARIANTS[variant], *extra]
    record = directory / RUN_RECORD
    threads = (os.environ if environment is None else environment).get("OMP_NUM_THREADS", "all")
    if record.exists():
        recorded = json.loads(record.read_text())
        if recorded.get("options") != options:
            raise RuntimeError(f"{variant} seed {seed}: {directory} was run with other main.py options "
                               f"({' '.join(recorded.get('options', [])) or 'none'}); "
                               f"choose another --out to compare different settings")
        if recorded.get("threads", "all") != threads:
            logger.warning("%s seed %d: started with %s threads, now %s; its numbers differ from a run with one "
                           "thread count throughout", variant, seed, recorded.get("threads", "all"), threads)
    if (directory / "results.json").exists():
        logger.info("%s seed %d: finished earlier, reusing %s", variant, seed, directory)
        return directory
    if (directory / "checkpoints" / "last.pt").exists():
        command = [sys.executable, "main.py", "--resume", str(directory)]
        logger.info("%s seed %d: resuming %s", variant, seed, directory)
    else:
        command = [sys.executable, "main.py", "--seed", str(seed), "--out-dir", str(directory), *options]
        logger.info("%s seed %d: %s", variant, seed, " ".join(command[1:]))
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record, dict(variant=variant, seed=seed, options=options, threads=threads))
    if not progress:
        command.append("--no-progress")
    result = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=environment)
    if result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit status {result.returncode}"
        raise RuntimeError(f"{variant} seed {seed} failed ({directory}): {last}")
    return directory


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (affinity, cgroup-pinned jobs)
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def run_all(out: Path, runs: list[tuple[str, int]], extra: list[str], jobs: int, progress: bool) -> list[str]:
    """Every (variant, seed) through `run_one`, `jobs` at a time; returns the failures' messages.

    With several jobs each run gets an equal share of the cores (OMP_NUM_THREADS, unless the caller
    set it), so concurrent runs do not oversubscribe them; a run's numbers then match a serial run with
    that thread count, not one with all threads. A failed run does not stop the others. Ctrl-C cancels
    the runs not yet started; the running ones receive the same interrupt and stop.
    """
    environment = None
    concurrent = min(jobs, len(runs))
    if concurrent > 1 and "OMP_NUM_THREADS" not in os.environ:
        environment = {**os.environ, "OMP_NUM_THREADS": str(max(1, _available_cores() // concurrent))}
    failures = []
    with ThreadPoolExecutor(max_workers=max(1, concurrent)) as pool, logging_redirect_tqdm(), \
            tqdm(total=len(runs), desc="ablation runs", disable=not progress) as bar:
        names = {pool.submit(run_one, out, variant, seed, extra, False, environment): (variant, seed)
                 for variant, seed in runs}
        try:
            for future in as_completed(names):
                try:
                    future.result()
                except RuntimeError as error:
                    failures.append(str(error))
                except Exception as error:  # a broken run record, an OSError: still report it with the others
                    variant, seed = names[future]
                    failures.append(f"{variant} seed {seed}: {error!r}")
                bar.update()
        except KeyboardInterrupt:
            for future in names:
                future.cancel()
            raise
    return failures


def collect(out: Path, variants: list[str], seeds: list[int]) -> dict[str, dict[int, dict]]:
    """results.json figures of every finished run: {variant: {seed: metrics}}."""
    table: dict[str, dict[int, dict]] = {}
    for variant in variants:
        for seed in seeds:
            path = run_directory(out, variant, seed) / "results.json"
            if path.exists():
                table.setdefault(variant, {})[seed] = run_metrics(json.loads(path.read_text()))
    return table


# ----------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------
def _cell(mean: float, std: float, count: int, seeds: int) -> str:
    """mean ± std; the number of runs is shown when some seeds have not finished."""
    if count == 0:
        return "-"
    if count == 1:
        return f"{mean:.3f} (1 run)"
    return f"{mean:.3f} ± {std:.3f}" + (f" ({count} runs)" if count < seeds else "")


def _interval(mean: float, low: float, high: float, count: int) -> str:
    if count == 0:
        return "-"
    if count < 2:
        return f"{mean:+.3f} (1 seed)"
    marker = " *" if low > 0 or high < 0 else ""
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]{marker}"


def summarise(table: dict[str, dict[int, dict]], variants: list[str], seeds: list[int]) -> dict:
    """Means, standard deviations and paired differences to the reference, per metric and variant."""
    summary: dict = {"seeds": seeds, "variants": variants, "metrics": {}}
    for key in METRIC_TITLES:
        entry = {}
        reference = [table.get(REFERENCE, {}).get(seed, {}).get(key) for seed in seeds]
        for variant in variants:
            values = [table.get(variant, {}).get(seed, {}).get(key) for seed in seeds]
            mean, std, count = mean_and_std(values)
            entry[variant] = dict(values=values, mean=mean, std=std, runs=count)
            if variant != REFERENCE and REFERENCE in variants:
                difference, low, high, pairs = paired_difference(values, reference)
                entry[variant].update(difference=difference, difference_low=low, difference_high=high, pairs=pairs)
        summary["metrics"][key] = entry
    return summary


def format_markdown(summary: dict) -> str:
    variants = summary["variants"]
    others = [variant for variant in variants if variant != REFERENCE]
    seeds = ", ".join(str(seed) for seed in summary["seeds"])
    lines = [f"Seeds {seeds}: mean ± standard deviation over seeds (a cell says how many runs it holds when "
             "some have not finished).", "",
             "| figure | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for key, title in METRIC_TITLES.items():
        entry = summary["metrics"][key]
        if all(entry[variant]["runs"] == 0 for variant in variants):
            continue
        lines.append(f"| {title} | " + " | ".join(_cell(entry[v]["mean"], entry[v]["std"], entry[v]["runs"], len(summary["seeds"])) for v in variants) + " |")
    if others and REFERENCE in variants:
        lines += ["", f"Paired difference to `{REFERENCE}` (variant − {REFERENCE}) over seeds, with its 95% t-interval; "
                      "* marks an interval that excludes 0.", "",
                  "| figure | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for key, title in METRIC_TITLES.items():
            entry = summary["metrics"][key]
            if all(entry[variant].get("pairs", 0) == 0 for variant in others):
                continue
            lines.append(f"| {title} | " + " | ".join(
                _interval(entry[v]["difference"], entry[v]["difference_low"], entry[v]["difference_high"], entry[v]["pairs"])
                for v in others) + " |")
    return "\n".join(lines)


def per_run_csv(table: dict[str, dict[int, dict]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, ["variant", "seed", *METRIC_TITLES])
    writer.writeheader()
    for variant, runs in table.items():
        for seed, metrics in sorted(runs.items()):
            writer.writerow(dict(variant=variant, seed=seed, **{key: metrics.get(key) for key in METRIC_TITLES}))
    return text.getvalue()


def full_loses_on_decorrelated(summary: dict) -> bool:
    entry = summary["metrics"]["decorrelated_auc"]
    return any(entry[variant].get("difference", -math.inf) > 0 for variant in summary["variants"] if variant != REFERENCE)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.ablation",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default: 0 1 2)")
    parser.add_argument("--variants", nargs="+", default=["full", "no-cross", "no-alignment", "none"], choices=list(VARIANTS),
                        help="which CIPL terms to switch off: " + "; ".join(
                            f"{name}: {' '.join(flags) or 'all terms on'}" for name, flags in VARIANTS.items()))
    parser.add_argument("--out", default="runs/ablation", help="folder of the runs and the table (default: runs/ablation)")
    parser.add_argument("--table-only", action="store_true", help="do not train: tabulate the finished runs under --out")
    parser.add_argument("--no-gradient-share", action="store_true",
                        help="skip the gradient-share measurement on the full runs")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="runs at a time (default: 1). On a GPU several small runs share the card; each run "
                             "gets 1/N of the CPU threads, so its numbers match a serial run with that many threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="after '--': options passed to every main.py run (e.g. -- --samples-per-epoch 2400, the schedule of the README's proving-ground figures)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    extra = [item for item in args.extra if item != "--"]
    if REFERENCE not in args.variants:
        logger.warning("'%s' is not among the variants: no paired differences will be reported", REFERENCE)
    if len(set(args.seeds)) != len(args.seeds):
        print("experiments.ablation: error: --seeds repeats a seed", file=sys.stderr)
        return 2
    if len(set(args.variants)) != len(args.variants):
        print("experiments.ablation: error: --variants repeats a variant", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()  # the runs execute in the project root, the table is read from here
    if args.jobs < 1:
        print("experiments.ablation: error: --jobs must be at least 1", file=sys.stderr)
        return 2
    if not args.table_only:
        runs = [(variant, seed) for seed in args.seeds for variant in args.variants]
        failures = run_all(out, runs, extra, args.jobs, progress=not args.no_progress)
        for failure in failures:
            print(f"experiments.ablation: error: {failure}", file=sys.stderr)
        if failures:
            return 1
    table = collect(out, args.variants, args.seeds)
    if not table:
        print(f"experiments.ablation: error: no finished runs under {out}", file=sys.stderr)
        return 2
    summary = summarise(table, args.variants, args.seeds)
    text = format_markdown(summary)
    if (not args.no_gradient_share and REFERENCE in table and full_loses_on_decorrelated(summary)):
        shares = [measure_gradient_shares(run_directory(out, REFERENCE, seed)) for seed in sorted(table[REFERENCE])]
        summary["gradient_shares"] = shares
        text += ("\n\nFull CIPL does not beat every variant on the decorrelated split. Share of the gradient that each "
                 "weighted loss term sends to the feature map z (paired batches of the training set, "
                 "model at the end of training), mean over the full runs:\n\n" + format_shares(shares))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ablation.md", text + "\n")
    atomic_write_text(out / "ablation.csv", per_run_csv(table))
    atomic_write_json(out / "ablation.json", _json(summary))
    print(text)
    return 0


def _json(value):
    if isinstance(value, dict):
        return {str(key): _json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    sys.exit(main())
