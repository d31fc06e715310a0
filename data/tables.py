"""Reading label tables, shared by the readers: CSV and spreadsheets, label lists -> multi-hot
targets with No Finding derived, and the NIH box file format (which the CSV reader accepts too).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from data.base import NO_FINDING, Box, DataError
from data.preflight import plural

BOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}  # the NIH box file's spelling -> the label file's


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or spreadsheet as strings, header names stripped, fully empty rows dropped."""
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        if path.suffix.lower() in (".xlsx", ".xls"):
            frame = pd.read_excel(path, dtype=str)
        else:
            frame = pd.read_csv(path, dtype=str, skipinitialspace=True)
    except Exception as error:  # pandas/openpyxl raise a zoo of types for a broken file
        raise DataError(f"cannot read {path}: {error}".splitlines()[0]) from None
    frame.columns = [str(name).strip() for name in frame.columns]
    return frame.dropna(how="all").reset_index(drop=True)


def require_columns(frame: pd.DataFrame, columns: Iterable[str], path: Path) -> None:
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise DataError(
            f"{path} lacks the column{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} "
            f"(it has: {', '.join(repr(c) for c in frame.columns[:20])})"
        )


def multi_hot(label_sets: Sequence[Iterable[str]], diseases: Sequence[str], where: str,
              no_finding: str = NO_FINDING) -> np.ndarray:
    """Label-name sets -> float32 [N, C+1] with No Finding last (1 iff no disease).

    ``no_finding`` in a set is accepted and ignored (it is derived); any other name not in
    ``diseases`` raises, naming the label, how often it occurs and ``where``.
    """
    column = {name: index for index, name in enumerate(diseases)}
    targets = np.zeros((len(label_sets), len(diseases) + 1), dtype=np.float32)
    unknown: dict[str, int] = {}
    for row, labels in enumerate(label_sets):
        for label in labels:
            if label == no_finding:
                continue
            if label in column:
                targets[row, column[label]] = 1.0
            else:
                unknown[label] = unknown.get(label, 0) + 1
    if unknown:
        listed = ", ".join(f"{name!r} ({count}x)" for name, count in sorted(unknown.items(), key=lambda kv: -kv[1])[:8])
        raise DataError(f"unknown labels in {where}: {listed}; known: {', '.join(diseases)}")
    targets[:, -1] = targets[:, :-1].sum(axis=1) == 0
    return targets


def split_labels(value, separator: str = "|") -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return [part.strip() for part in str(value).split(separator) if part.strip()]


def is_no_finding(name: str) -> bool:
    """"No Finding", "No finding" (VinDr-CXR), "no_finding": the derived class, never a disease."""
    return name.strip().lower().replace("_", " ") == NO_FINDING.lower()


def origin_tag(*paths) -> str:
    """A short hash of where a pool came from, so caches of two datasets never collide."""
    return hashlib.sha256("\n".join(os.path.abspath(str(p)) for p in paths).encode()).hexdigest()[:8]


def _duplicates(values: Sequence[str]) -> list[str]:
    seen, repeated = set(), []
    for value in values:
        if value in seen:
            repeated.append(value)
        seen.add(value)
    return repeated


def refuse_duplicates(values: Sequence[str], where: str) -> None:
    repeated = _duplicates(values)
    if repeated:
        raise DataError(f"{where} lists {plural(len(repeated), 'image')} more than once (e.g. {', '.join(repeated[:5])})")


def read_box_file(path: Path, class_names: Sequence[str], extra_aliases: dict[str, str] | None = None) -> dict[str, list[Box]]:
    """The NIH BBox_List_2017.csv format -> image name -> [(class, x, y, w, h)] in the file's frame.

    Header ``Image Index,Finding Label,Bbox [x,y,w,h],,,``: pandas splits the bracketed name and
    names the trailing empty columns "Unnamed: N", so x, y, w, h are taken by position (2..5).
    ``extra_aliases`` (label -> one of class_names) adds accepted spellings, e.g. the names an
    external set's ``--label-map`` renames its labels to.
    """
    frame = read_table(path)
    require_columns(frame, ["Image Index", "Finding Label"], path)
    if frame.shape[1] < 6:
        raise DataError(f"{path} has {frame.shape[1]} columns; the box format needs Image Index, Finding Label, x, y, w, h")
    column = {name: index for index, name in enumerate(class_names[:-1])}
    known = {**BOX_LABEL_ALIASES, **(extra_aliases or {})}
    aliases = {alias: name for alias, name in known.items() if alias not in column and name in column}
    boxes: dict[str, list[Box]] = {}
    unknown, broken = set(), []
    for row_number, row in enumerate(frame.itertuples(index=False), start=2):
        image, label = str(row[0]).strip(), str(row[1]).strip()
        label = aliases.get(label, label)
        if label not in column:
            unknown.add(label)
            continue
        try:
            x, y, w, h = (float(value) for value in row[2:6])
        except (TypeError, ValueError):
            broken.append(row_number)
            continue
        if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
            broken.append(row_number)
            continue
        boxes.setdefault(image, []).append((column[label], x, y, w, h))
    if unknown:
        raise DataError(f"unknown box labels in {path}: {', '.join(sorted(unknown))}; known: {', '.join(class_names[:-1])}")
    if broken:
        raise DataError(f"{path}: {len(broken)} rows without a valid x, y, w, h (rows {', '.join(map(str, broken[:5]))})")
    return boxes
