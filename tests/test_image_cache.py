"""The one-time image cache: same pixels as resizing the source, reused, rebuilt on change, never half."""
from __future__ import annotations

import os
import pickle

import cv2
import numpy as np
import pytest

from data import image_cache, images
from data.registry import build_datasets
from datasets import DataError
from test_sources import make_nih, nih_config, write_png


def cache_files(directory):
    return sorted(path.name for path in directory.iterdir())


def test_cache_matches_a_resize_of_the_source_and_labels_are_unchanged(tmp_path):
    root = make_nih(tmp_path / "nih")
    raw = build_datasets(nih_config(root, cache=False))
    cached = build_datasets(nih_config(root, cache_dir=str(tmp_path / "cache")))
    for split in ("train", "val", "test"):
        plain, fast = getattr(raw, split), getattr(cached, split)
        assert plain.image_ids == fast.image_ids
        np.testing.assert_array_equal(plain.targets, fast.targets)
    source = cv2.imread(str(raw.test.image_paths[0]), cv2.IMREAD_GRAYSCALE)
    expected = cv2.resize(source, (68, 68), interpolation=cv2.INTER_LINEAR)  # 64 -> 68 px: upsampling
    image = cached.test.load_image(0)
    assert image.dtype == np.uint8 and image.flags.writeable
    np.testing.assert_array_equal(image, expected)
    # One array + one index per pool (train_val, test), in the default-overridable cache folder.
    names = cache_files(tmp_path / "cache")
    assert len([n for n in names if n.endswith(".npy")]) == 2 and len([n for n in names if n.endswith(".json")]) == 2


def test_default_cache_folder_is_under_the_data_root(tmp_path):
    root = make_nih(tmp_path / "nih")
    build_datasets(nih_config(root))
    assert any(name.endswith(".npy") for name in os.listdir(root / ".cipl-cache"))


def test_cache_is_reused_without_decoding(tmp_path, monkeypatch):
    root = make_nih(tmp_path / "nih")
    config = nih_config(root, cache_dir=str(tmp_path / "cache"))
    first = build_datasets(config)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}

    def refuse(*args, **kwargs):
        raise AssertionError("a valid cache must not decode the source images again")

    monkeypatch.setattr(images, "read_image", refuse)
    again = build_datasets(config)
    np.testing.assert_array_equal(first.train.load_image(3), again.train.load_image(3))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == before
    # Another validation fraction is a new view on the same pools: still no rebuild.
    build_datasets(nih_config(root, cache_dir=str(tmp_path / "cache"), val_fraction=0.4))


def test_cache_is_rebuilt_when_a_source_or_the_size_changes(tmp_path):
    root = make_nih(tmp_path / "nih")
    config = nih_config(root, cache_dir=str(tmp_path / "cache"))
    old = build_datasets(config)
    old_names = cache_files(tmp_path / "cache")
    old_image = old.test.load_image(0)
    target = old.test.image_paths[0]
    write_png(target, 64, seed=99)  # replaced image: new size/mtime
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    new = build_datasets(config)
    assert not np.array_equal(old_image, new.test.load_image(0))
    new_names = cache_files(tmp_path / "cache")
    assert len(new_names) == len(old_names)  # the stale test cache was removed, train_val kept
    assert len(set(new_names) & set(old_names)) == 2
    bigger = build_datasets(nih_config(root, cache_dir=str(tmp_path / "cache"), image_size=96))
    assert bigger.train.load_image(0).shape == (102, 102)  # ceil(1.0625 x 96)
    assert len(cache_files(tmp_path / "cache")) == 8  # other sizes are kept: both stay usable


def test_interrupted_build_is_never_taken_for_a_whole_cache(tmp_path, monkeypatch):
    root = make_nih(tmp_path / "nih")
    config = nih_config(root, cache_dir=str(tmp_path / "cache"), decode_threads=1)
    real_resize = image_cache.resize_square
    calls = {"n": 0}

    def interrupted(image, side):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_resize(image, side)

    monkeypatch.setattr(image_cache, "resize_square", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_datasets(config)
    assert cache_files(tmp_path / "cache") == []  # no partial array, no index
    monkeypatch.setattr(image_cache, "resize_square", real_resize)

    # A crash that skips cleanup (killed process): the array is there but the index (the seal) is not.
    built = build_datasets(config)
    for index_file in (tmp_path / "cache").glob("*.json"):
        index_file.unlink()
    leftover = next((tmp_path / "cache").glob("*.npy"))
    leftover.with_name(leftover.name + ".partial-999999999").write_bytes(b"half")
    rebuilt = build_datasets(config)
    np.testing.assert_array_equal(built.train.load_image(0), rebuilt.train.load_image(0))
    names = cache_files(tmp_path / "cache")
    assert not any(".partial-" in name for name in names) and len(names) == 4


def test_cached_dataset_pickles_without_its_pixels(tmp_path):
    root = make_nih(tmp_path / "nih")
    splits = build_datasets(nih_config(root, cache_dir=str(tmp_path / "cache")))
    pool = splits.test
    pool.load_image(0)  # opens the memory map
    payload = pickle.dumps(pool)
    assert len(payload) < 20_000
    np.testing.assert_array_equal(pickle.loads(payload).load_image(2), pool.load_image(2))


def test_cache_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    root = make_nih(tmp_path / "nih")

    class Tiny:
        free = 1000

    monkeypatch.setattr(image_cache.shutil, "disk_usage", lambda path: Tiny)
    with pytest.raises(DataError, match="--no-cache"):
        build_datasets(nih_config(root, cache_dir=str(tmp_path / "cache")))
