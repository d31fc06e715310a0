"""Push (utils/projection.py) against a slow reference, and push.py's outputs and refusals."""
import hashlib
import json

import cv2
import numpy as np
import pytest
import torch

import push
from conftest import tiny_config
from datasets import EvalTransform, TransformedDataset, build_datasets
from model import build_model
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.projection import (PushCandidates, capped_selection, cell_caps, push_prototypes, warn_about_unused,
                              warn_if_cap_cannot_hold)
from utils.visualise import TRUTH_COLOUR, UNSELECTIVE_TITLE_COLOUR, GalleryEntry, gallery_figure


def spread_model(config):
    """A tiny untrained model whose features differ clearly between patches (an untrained add-on's
    sigmoid sits near 0.5 everywhere, which would make every candidate a near-tie)."""
    torch.manual_seed(0)
    model = build_model(config)
    torch.nn.init.normal_(model.top_layer.weight, std=5.0)
    for layer in model.add_on:
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.normal_(layer.weight, std=1.0)
            torch.nn.init.normal_(layer.bias, std=0.5)
    return model.eval()


def write_checkpoint(path, config, model):
    save_checkpoint(path, dict(model=model.state_dict(), config=config.to_dict(), class_names=model.class_names,
                               prototype_provenance=[], model_description=model.description()))
    return path


@pytest.fixture(scope="module")
def tiny_setup():
    config = tiny_config(image_size=96)  # 12 x 12 feature maps (the tiny backbone has stride 8)
    return config, build_datasets(config)


def reference_push(features: torch.Tensor, prototypes: torch.Tensor, targets: np.ndarray, prototype_class: list[int]):
    """METHOD.md's rule written out: prototypes in index order, each takes the nearest (image, location)
    among images of its class that no earlier prototype took; when every image of its class is taken
    (a class with fewer images than the prototypes that reach it) it takes the nearest of them all and
    is marked reused. float64, explicit loops. Returns (distance, image, (row, col), reused) per prototype."""
    features = features.double()
    used, chosen = set(), []
    for j, p in enumerate(prototypes.double()):
        best = {True: None, False: None}  # keyed by "image already taken"
        for image in range(features.shape[0]):
            if targets[image, prototype_class[j]] <= 0:
                continue
            distances = ((features[image] - p[:, None, None]) ** 2).sum(0)
            value = float(distances.min())
            taken = image in used
            if best[taken] is None or value < best[taken][0]:
                flat = int(distances.argmin())
                best[taken] = (value, image, divmod(flat, distances.shape[1]))
        if best[False] is not None:
            choice, reused = best[False], False
        else:
            choice, reused = best[True], True
        used.add(choice[1])
        chosen.append((*choice, reused))
    return chosen


def test_push_follows_the_nonrepetitive_rule_exactly(tiny_setup):
    config, splits = tiny_setup
    model = spread_model(config)
    before = model.prototypes.detach().clone()
    dataset = TransformedDataset(splits.train, EvalTransform(config.image_size))
    with torch.no_grad():
        features = model.extract_features(torch.stack([dataset[i]["image"] for i in range(len(dataset))]))
    expected = reference_push(features, before, splits.train.targets, model.prototype_class.tolist())

    records = push_prototypes(model, dataset, "cpu", batch_size=10, progress=False, image_ids=splits.train.image_ids)

    images = model.prototype_source_index.tolist()
    fresh = [images[j] for j, choice in enumerate(expected) if not choice[3]]
    assert len(set(fresh)) == len(fresh), "an image was used twice although its class had a free one"
    for j, (distance, image, (row, col), reused) in enumerate(expected):
        assert images[j] == image
        assert records[j]["reused_image"] == reused
        assert model.prototype_source_location[j].tolist() == [row, col]
        assert splits.train.targets[image, model.prototype_class[j]] == 1, "pushed onto an image of another class"
        # The prototype is now the feature vector at its recorded location ...
        torch.testing.assert_close(model.prototypes[j].detach(), features[image, :, row, col], atol=1e-5, rtol=0)
        # ... and the recorded distance is the minimum distance that chose it.
        assert model.prototype_source_distance[j].item() == pytest.approx(distance, rel=1e-4, abs=1e-6)
        assert records[j]["image_id"] == splits.train.image_ids[image] and records[j]["location"] == [row, col]
    # How many images of its class each prototype was the nearest of the class's prototypes to, before the push.
    nearest = np.zeros(len(before), dtype=int)
    classes = model.prototype_class.tolist()
    for image in range(features.shape[0]):
        for c in np.flatnonzero(splits.train.targets[image] > 0):
            own = [j for j in range(len(before)) if classes[j] == c]
            gaps = [float(((features[image].double() - before[j].double()[:, None, None]) ** 2).sum(0).min()) for j in own]
            nearest[own[int(np.argmin(gaps))]] += 1
    assert [record["nearest_before_push"] for record in records] == nearest.tolist()


def reference_capped_push(features: torch.Tensor, prototypes: torch.Tensor, targets: np.ndarray,
                          prototype_class: list[int], cap: int):
    """The push with the cell cap written out: prototype j takes the nearest (image, cell) among images
    of its class that no earlier prototype took, on a cell holding fewer than ``cap`` prototypes of its
    class; it was moved by the cap when the nearest such pair on any cell is nearer. When every image
    of its class is taken, the same over all of them (reused). float64, loops. Returns (distance,
    image, (row, col), moved, reused) per prototype."""
    features = features.double()
    width = features.shape[-1]
    used, taken, chosen = set(), {}, []
    for j, p in enumerate(prototypes.double()):
        klass = prototype_class[j]
        for reused in (False, True):
            best_open = best_any = None
            for image in range(features.shape[0]):
                if targets[image, klass] <= 0 or (image in used and not reused):
                    continue
                distances = ((features[image] - p[:, None, None]) ** 2).sum(0).flatten()
                for cell, value in enumerate(distances.tolist()):
                    key = (value, image, cell)
                    best_any = key if best_any is None or key < best_any else best_any
                    if taken.get((klass, cell), 0) < cap and (best_open is None or key < best_open):
                        best_open = key
            if best_open is not None:
                break
        value, image, cell = best_open
        used.add(image)
        taken[(klass, cell)] = taken.get((klass, cell), 0) + 1
        chosen.append((value, image, divmod(cell, width), best_open != best_any, reused))
    return chosen


def test_cell_cap_follows_its_rule_exactly(caplog):
    config = tiny_config(image_size=96, prototypes_per_class=6)
    splits = build_datasets(config)
    model = spread_model(config)
    # Every prototype of a class starts near one corner patch of one image of the class: the plain push
    # piles them onto that corner cell of other images, and the cap (2 of 6 per cell at share 0.34)
    # binds. The small classes also run out of images, so the reused fallback is exercised too.
    dataset = TransformedDataset(splits.train, EvalTransform(config.image_size))
    with torch.no_grad():
        features = model.extract_features(torch.stack([dataset[i]["image"] for i in range(len(dataset))]))
        for klass in range(model.num_classes):
            image = int(np.flatnonzero(splits.train.targets[:, klass] > 0)[0])
            model.prototypes[model.prototype_class == klass] = features[image, :, 0, 0] + 0.01 * torch.randn(
                int((model.prototype_class == klass).sum()), features.shape[1])
    before = model.prototypes.detach().clone()
    plain = spread_model(config)
    with torch.no_grad():
        plain.prototypes.copy_(before)
    push_prototypes(plain, dataset, "cpu", batch_size=10, progress=False)
    per_cell = {}
    for klass, cell in zip(plain.prototype_class.tolist(), plain.prototype_source_location.tolist()):
        per_cell[(klass, *cell)] = per_cell.get((klass, *cell), 0) + 1
    assert max(per_cell.values()) > 2, "the fixture must pile prototypes up, or the cap is not tested"

    expected = reference_capped_push(features, before, splits.train.targets, model.prototype_class.tolist(), cap=2)
    with caplog.at_level("INFO", logger="utils.projection"):
        records = push_prototypes(model, dataset, "cpu", batch_size=10, progress=False, max_cell_share=0.34)
    assert any(choice[4] for choice in expected)
    for j, (distance, image, (row, col), moved, reused) in enumerate(expected):
        assert model.prototype_source_index[j].item() == image
        assert model.prototype_source_location[j].tolist() == [row, col]
        assert model.prototype_source_distance[j].item() == pytest.approx(distance, rel=1e-4, abs=2e-5)  # float32 distances of near-equal vectors
        torch.testing.assert_close(model.prototypes[j].detach(), features[image, :, row, col], atol=1e-5, rtol=0)
        assert records[j]["moved_by_cell_cap"] == moved and records[j]["reused_image"] == reused
        assert (records[j]["distance_given_up"] > 0) == moved
    per_cell = {}
    for klass, cell in zip(model.prototype_class.tolist(), model.prototype_source_location.tolist()):
        per_cell[(klass, *cell)] = per_cell.get((klass, *cell), 0) + 1
    assert max(per_cell.values()) <= 2
    assert sum(record["moved_by_cell_cap"] for record in records) > 0
    assert "prototypes off a full cell" in caplog.text and "elsewhere than the paper's push" in caplog.text


def brute_force_capped(table: np.ndarray, prototype_class: np.ndarray, cap: np.ndarray):
    """Every class capped, written out: prototype j takes the smallest (distance, image, cell) over
    unused images (all images if none is unused) and cells holding fewer than its class's cap (all
    cells if none does). table: [P, N, cells], inf where the image lacks the class."""
    num_prototypes, num_images, cells = table.shape
    used, taken, chosen = set(), {}, []
    for j in range(num_prototypes):
        klass = prototype_class[j]
        open_cells = [c for c in range(cells) if taken.get((klass, c), 0) < cap[klass]] or list(range(cells))
        pairs = [(table[j, i, c], i, c) for i in range(num_images) for c in open_cells if np.isfinite(table[j, i, c])]
        if not pairs:
            chosen.append((-1, 0))
            continue
        free = [pair for pair in pairs if pair[1] not in used]
        _, image, cell = min(free or pairs)
        used.add(image)
        taken[(klass, cell)] = taken.get((klass, cell), 0) + 1
        chosen.append((image, cell))
    return chosen


def test_capped_selection_equals_every_class_capped_on_random_tables():
    """The selection with its rescans (utils.projection.capped_selection) against the rule with every
    class capped from the start, on random tables with ties, shared images, small classes and rescans
    in several rounds."""
    generator = np.random.default_rng(0)
    rounds_seen = set()
    for _ in range(150):
        num_classes, per_class = int(generator.integers(2, 4)), int(generator.integers(2, 6))
        num_images, cells = int(generator.integers(3, 12)), int(generator.integers(1, 5))
        prototype_class = np.repeat(np.arange(num_classes), per_class)
        generator.shuffle(prototype_class)  # classes interleaved in prototype order
        targets = generator.random((num_images, num_classes)) < 0.6
        table = generator.integers(0, 6, size=(len(prototype_class), num_images, cells)).astype(np.float32)
        table[~targets[:, prototype_class].T] = np.inf
        k = len(prototype_class)
        # The plain scan's candidates: per image its nearest cell (first on ties), k nearest images.
        nearest_cell = table.argmin(axis=2)
        nearest = np.take_along_axis(table, nearest_cell[..., None], axis=2)[..., 0]
        order = np.lexsort((np.broadcast_to(np.arange(num_images), nearest.shape), nearest), axis=1)[:, :k]
        pad = max(0, k - num_images)
        images = np.where(np.isfinite(np.take_along_axis(nearest, order, 1)), order, -1)
        candidates = PushCandidates(
            torch.from_numpy(np.pad(np.take_along_axis(nearest, order, 1), ((0, 0), (0, pad)), constant_values=np.inf)),
            torch.from_numpy(np.pad(images, ((0, 0), (0, pad)), constant_values=-1)),
            torch.from_numpy(np.pad(np.take_along_axis(nearest_cell, order, 1), ((0, 0), (0, pad)))),
            torch.zeros(len(prototype_class), dtype=torch.long))
        rounds = []

        def scan_by_cell(prototypes):
            rounds.append(prototypes)
            by_cell = table[prototypes].transpose(0, 2, 1)  # [p, cells, N]
            order = np.lexsort((np.broadcast_to(np.arange(num_images), by_cell.shape), by_cell), axis=2)[..., :k]
            distances = np.take_along_axis(by_cell, order, 2)
            return (np.pad(distances, ((0, 0), (0, 0), (0, pad)), constant_values=np.inf),
                    np.pad(np.where(np.isfinite(distances), order, -1), ((0, 0), (0, 0), (0, pad)), constant_values=-1))

        cap = cell_caps(prototype_class, num_classes, float(generator.choice([0.2, 0.34, 0.5])))
        _, selection = capped_selection(candidates, num_images, prototype_class, cap, scan_by_cell)
        expected = brute_force_capped(table, prototype_class, cap)
        assert list(zip(selection.image.tolist(), selection.location.tolist())) == [
            (image, cell if image >= 0 else 0) for image, cell in expected]
        rounds_seen.add(len(rounds))
    assert {0, 1, 2} <= rounds_seen, "the tables must exercise no rescan, one, and several"


def test_cell_cap_warns_when_it_cannot_hold(caplog):
    prototype_class = np.array([0] * 6 + [1] * 2)
    cap = cell_caps(prototype_class, 2, 0.25)  # 1 per cell for both
    with caplog.at_level("WARNING", logger="utils.projection"):
        warn_if_cap_cannot_hold(prototype_class, cap, 4, ["Mass", "No Finding"])
    assert "Mass (6 prototypes, 4 cells, at most 1 each)" in caplog.text and "No Finding" not in caplog.text


def test_cell_cap_that_never_binds_changes_nothing(tiny_setup):
    config, splits = tiny_setup
    dataset = TransformedDataset(splits.train, EvalTransform(config.image_size))
    plain, capped = spread_model(config), spread_model(config)
    plain_records = push_prototypes(plain, dataset, "cpu", batch_size=10, progress=False)
    capped_records = push_prototypes(capped, dataset, "cpu", batch_size=10, progress=False, max_cell_share=0.99)
    assert torch.equal(plain.prototypes, capped.prototypes)
    assert torch.equal(plain.prototype_source_location, capped.prototype_source_location)
    assert not any(record["moved_by_cell_cap"] for record in capped_records)
    assert all("moved_by_cell_cap" not in record for record in plain_records)


def test_push_warns_when_most_of_a_class_learnt_no_patch(caplog):
    config = tiny_config(image_size=64, prototypes_per_class=4)
    dataset = TransformedDataset(build_datasets(config).train, EvalTransform(config.image_size))
    model = spread_model(config)
    far = torch.arange(model.num_prototypes) % 4 >= 1  # three of every class's four: far from every patch
    with torch.no_grad():
        model.prototypes[far] += 100.0
    with caplog.at_level("WARNING", logger="utils.projection"):
        records = push_prototypes(model, dataset, "cpu", batch_size=16, progress=False)
    assert [record["nearest_before_push"] == 0 for record in records] == far.tolist()
    assert "is not pulling them onto a training patch" in caplog.text and "Atelectasis 3 of 4" in caplog.text


def test_unused_prototype_warning_needs_most_of_a_class(caplog):
    classes, names = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), ["Mass", "No Finding"]
    with caplog.at_level("WARNING", logger="utils.projection"):
        warn_about_unused(torch.tensor([5, 0, 3, 0, 9, 1, 1, 1]), classes, names)  # 2 of 4: half, not most
    assert caplog.text == ""
    with caplog.at_level("WARNING", logger="utils.projection"):
        warn_about_unused(torch.tensor([5, 0, 3, 0, 9, 0, 0, 0]), classes, names)
    assert "(No Finding 3 of 4)" in caplog.text and "Mass" not in caplog.text


def run_push(argv, capsys=None):
    code = push.main(argv)
    return code, (capsys.readouterr().err if capsys is not None else "")


def test_push_script_writes_gallery_json_and_a_new_checkpoint(tmp_path, tiny_setup, capsys):
    config, _ = tiny_setup
    model = spread_model(config)
    checkpoint = write_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", config, model)
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()

    code, _ = run_push(["--checkpoint", str(checkpoint), "--no-progress"])
    assert code == 0
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest, "the input checkpoint was modified"
    pushed = load_checkpoint(tmp_path / "run" / "checkpoints" / "best_pushed.pt")
    assert (pushed["model"]["prototype_source_index"] >= 0).all()
    out = tmp_path / "run" / "prototypes" / "best"
    listing = json.loads((out / "prototypes.json").read_text())
    entries = listing["prototypes"]
    assert len(entries) == model.num_prototypes
    grid = model.cell_grid(config.image_size)  # where the 12 x 12 feature map's cells look
    for entry, record in zip(entries, pushed["prototype_provenance"]):
        assert entry["image_id"] == record["image_id"] and entry["location"] == record["location"]
        assert entry["class_name"] == model.class_names[entry["class_index"]]
        assert entry["distance"] == pytest.approx(record["distance"])
        for name in entry["files"].values():
            assert (out / name).stat().st_size > 0
        # The high-activation box surrounds the centre of the feature cell the prototype was copied from.
        row, col = entry["location"]
        box = entry["box"]
        assert box["x"] <= grid.centres(col, config.image_size) <= box["x"] + box["w"]
        assert box["y"] <= grid.centres(row, config.image_size) <= box["y"] + box["h"]
        assert 0 < box["w"] * box["h"] < config.image_size ** 2
    # Each picture carries its source image's ground-truth boxes of the prototype's class, and only those.
    train = tiny_setup[1].train
    with_truth = 0
    for entry in entries:
        index = train.image_ids.index(entry["image_id"])
        own = [float(v) for box in train.boxes.get(index, []) if box[0] == entry["class_index"] for v in box[1:]]
        assert [b[key] for b in entry["truth_boxes"] for key in "xywh"] == pytest.approx(own)
        picture = cv2.imread(str(out / entry["files"]["source"]))[..., ::-1]  # RGB
        magenta = (picture == np.array(TRUTH_COLOUR, np.uint8)).all(-1).any()
        assert magenta == bool(own), entry["prototype"]
        with_truth += bool(own)
    assert with_truth >= 3, "too few prototypes on an image with a box of their class to test the boxes"
    flagged = listing["quality"]["overall"]["unselective_prototypes"]
    assert [entry["prototype"] for entry in entries if entry["unselective"]] == flagged
    assert pushed["unselective_prototypes"] == flagged  # what the reasoning figure marks
    galleries = sorted(p.name for p in (out / "gallery").iterdir())
    assert galleries == sorted(f"{push.slug(name)}.png" for name in model.class_names)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "staging folders left behind"

    # --visualise-only renders what the pushed checkpoint holds and writes no checkpoint.
    code, _ = run_push(["--checkpoint", str(tmp_path / "run" / "checkpoints" / "best_pushed.pt"), "--visualise-only",
                        "--out", str(tmp_path / "view"), "--no-progress"])
    assert code == 0
    again = json.loads((tmp_path / "view" / "prototypes.json").read_text())["prototypes"]
    assert [e["image_id"] for e in again] == [e["image_id"] for e in entries]
    assert [e["box"] for e in again] == [e["box"] for e in entries]
    # ... and keeps the push's count of how many images each prototype was the nearest to.
    assert [e["nearest_before_push"] for e in again] == [r["nearest_before_push"] for r in pushed["prototype_provenance"]]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best.pt", "best_pushed.pt"]


def test_push_script_refuses_bad_input_and_leaves_nothing(tmp_path, tiny_setup, capsys):
    config, _ = tiny_setup
    unpushed = write_checkpoint(tmp_path / "unpushed.pt", config, spread_model(config))
    out = tmp_path / "out"

    code, error = run_push(["--checkpoint", str(unpushed), "--visualise-only", "--out", str(out)], capsys)
    assert code != 0 and "never pushed" in error and error.count("\n") == 1
    assert not out.exists()

    not_cipl = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, not_cipl)
    code, error = run_push(["--checkpoint", str(not_cipl), "--out", str(out)], capsys)
    assert code != 0 and "not a CIPL checkpoint" in error and error.count("\n") == 1

    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    code, error = run_push(["--checkpoint", str(tmp_path / "garbage.pt"), "--out", str(out)], capsys)
    assert code != 0 and "not a readable PyTorch checkpoint" in error

    code, error = run_push(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)], capsys)
    assert code != 0 and "does not exist" in error

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    code, error = run_push(["--checkpoint", str(unpushed), "--out", str(foreign)], capsys)
    assert code != 0 and "non-empty folder" in error
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    assert not out.exists() and not (tmp_path / "unpushed_pushed.pt").exists()


def test_gallery_titles_an_unselective_prototype_in_red(tmp_path):
    picture = np.zeros((40, 40, 3), np.uint8)
    views = [GalleryEntry(prototype=j, class_index=0, image_id=f"img{j}", location=(1, 2), distance=0.5, similarity=0.99,
                          picture=picture, patch=picture[:10, :10]) for j in (3, 4)]
    figure = gallery_figure("Mass", views, tmp_path / "mass.png", unselective={4})
    titles = {axis.get_title(): axis.title.get_color() for axis in figure.axes if axis.get_title().startswith("prototype")}
    assert titles == {"prototype 3": "black", "prototype 4: matches all": UNSELECTIVE_TITLE_COLOUR}
    assert (tmp_path / "mass.png").stat().st_size > 0
