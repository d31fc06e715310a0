"""The network against METHOD.md's formulas, written out slowly."""
import copy
import math

import pytest
import torch

from model import (
    BACKBONE_GRID, BACKBONES, CIPL, CellGrid, EmaTeacher, TinyBackbone, build_backbone, co_attention, disease_probabilities,
    squared_distances,
)

CLASSES = ["A", "B", "C", "No Finding"]


def tiny_model(**overrides) -> CIPL:
    arguments = dict(backbone="tiny", prototype_dim=8, prototypes_per_class=2)
    arguments.update(overrides)
    return CIPL(CLASSES, **arguments)


def test_squared_distances_match_naive_loop():
    torch.manual_seed(0)
    features = torch.rand(2, 5, 3, 4, dtype=torch.float64)
    prototypes = torch.rand(6, 5, dtype=torch.float64)
    fast = squared_distances(features, prototypes)
    assert fast.shape == (2, 6, 3, 4)
    for n in range(2):
        for p in range(6):
            for h in range(3):
                for w in range(4):
                    expected = sum((features[n, d, h, w].item() - prototypes[p, d].item()) ** 2 for d in range(5))
                    assert math.isclose(fast[n, p, h, w].item(), expected, rel_tol=1e-9, abs_tol=1e-12)


def naive_co_attention(features_a, features_b):
    """Explicit loops over positions: A_ik = -||z_a(i) - z_b(k)||^2, softmax over k (rows) / i (columns)."""
    batch, dim, height, width = features_a.shape
    b_at_a = torch.zeros_like(features_a)
    a_at_b = torch.zeros_like(features_b)
    for n in range(batch):
        za = [features_a[n, :, i // width, i % width] for i in range(height * width)]
        zb = [features_b[n, :, k // width, k % width] for k in range(height * width)]
        affinity = [[-float(((a - b) ** 2).sum()) for b in zb] for a in za]
        for i, row in enumerate(affinity):
            peak = max(row)
            weights = [math.exp(value - peak) for value in row]
            total = sum(weights)
            b_at_a[n, :, i // width, i % width] = sum(w / total * zb[k] for k, w in enumerate(weights))
        for k in range(len(zb)):
            column = [affinity[i][k] for i in range(len(za))]
            peak = max(column)
            weights = [math.exp(value - peak) for value in column]
            total = sum(weights)
            a_at_b[n, :, k // width, k % width] = sum(w / total * za[i] for i, w in enumerate(weights))
    return b_at_a, a_at_b


def test_co_attention_matches_naive_formula():
    torch.manual_seed(1)
    features_a = torch.rand(2, 4, 3, 3, dtype=torch.float64) * 3
    features_b = torch.rand(2, 4, 3, 3, dtype=torch.float64) * 3
    fast_b_at_a, fast_a_at_b = co_attention(features_a, features_b)
    slow_b_at_a, slow_a_at_b = naive_co_attention(features_a, features_b)
    torch.testing.assert_close(fast_b_at_a, slow_b_at_a)
    torch.testing.assert_close(fast_a_at_b, slow_a_at_b)


def test_co_attention_of_identical_distinct_patches_recovers_them():
    # With well-separated patches each position attends (almost) only to its twin.
    features = torch.eye(4).view(1, 4, 2, 2) * 20
    b_at_a, a_at_b = co_attention(features, features.clone())
    torch.testing.assert_close(b_at_a, features, atol=1e-4, rtol=0)
    torch.testing.assert_close(a_at_b, features, atol=1e-4, rtol=0)


def test_forward_matches_method_formulas():
    torch.manual_seed(2)
    model = tiny_model().eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        output = model(images)
        features = model.extract_features(images)
    assert output.features.shape == (3, 8, 8, 8)  # the tiny backbone has stride 8
    assert 0 <= float(features.min()) and float(features.max()) <= 1
    distances = ((features.unsqueeze(1) - model.prototypes.view(1, -1, 8, 1, 1)) ** 2).sum(2)
    torch.testing.assert_close(output.similarity_maps, torch.exp(-distances / 8))
    torch.testing.assert_close(output.min_distances, distances.flatten(2).amin(2))
    scores = torch.exp(-distances.flatten(2).amin(2) / 8)
    # Class-identity last layer: a class logit is the sum of its own prototypes' scores.
    expected_logits = torch.stack([scores[:, 2 * c : 2 * c + 2].sum(1) for c in range(4)], dim=1)
    torch.testing.assert_close(output.logits, expected_logits)
    probabilities = disease_probabilities(output.logits)
    expected = torch.softmax(torch.stack([output.logits[:, 3:4].expand(-1, 3), output.logits[:, :3]], -1), -1)[..., 1]
    torch.testing.assert_close(probabilities, expected)


def test_tiny_backbone_sees_a_local_window_and_has_no_border_position_code():
    torch.manual_seed(0)
    backbone = build_backbone("tiny")[0].eval()
    # A uniform image gives the same features at every cell: reflecting padding tells a cell nothing
    # about how far it is from the edge (zero padding would make the border cells differ).
    with torch.no_grad():
        uniform = backbone(torch.full((1, 3, 128, 128), 0.7))
    assert uniform.shape[-2:] == (16, 16)
    torch.testing.assert_close(uniform, uniform[..., :1, :1].expand_as(uniform), atol=1e-5, rtol=1e-5)
    zero_padded = torch.nn.Sequential(*[
        torch.nn.Conv2d(m.in_channels, m.out_channels, 3, m.stride, 1, bias=False) if isinstance(m, torch.nn.Conv2d) else m
        for m in backbone]).eval()
    with torch.no_grad():
        for original, twin in zip(backbone, zero_padded):
            if isinstance(original, torch.nn.Conv2d):
                twin.weight.copy_(original.weight)
        zeros = zero_padded(torch.full((1, 3, 128, 128), 0.7))
    assert (zeros[..., 0, 0] - zeros[..., 8, 8]).abs().max() > 1e-3  # the control does see the border
    # Receptive field: an interior cell depends on a window of TinyBackbone.RECEPTIVE_FIELD pixels only.
    image = torch.randn(1, 3, 128, 128, requires_grad=True)
    backbone(image)[0, :, 8, 8].sum().backward()
    rows = torch.nonzero(image.grad.abs().sum(dim=(0, 1, 3)) > 0).flatten()
    cols = torch.nonzero(image.grad.abs().sum(dim=(0, 1, 2)) > 0).flatten()
    assert int(rows.max() - rows.min()) + 1 == TinyBackbone.RECEPTIVE_FIELD
    assert int(cols.max() - cols.min()) + 1 == TinyBackbone.RECEPTIVE_FIELD < 128 / 2


def test_prototype_class_and_initial_last_layer():
    model = tiny_model()
    assert model.prototype_class.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert model.last_layer.weight.shape == (4, 8)
    assert model.last_layer.bias is None
    for c in range(4):
        for j in range(8):
            assert model.last_layer.weight[c, j].item() == (1.0 if j // 2 == c else 0.0)
    assert 0 <= float(model.prototypes.detach().min()) and float(model.prototypes.detach().max()) < 1


def test_constrain_last_layer_zeroes_off_class_and_clamps_own_class():
    model = tiny_model()
    with torch.no_grad():
        model.last_layer.weight.copy_(torch.randn(4, 8))
    model.constrain_last_layer()
    weight = model.last_layer.weight
    for c in range(4):
        for j in range(8):
            if j // 2 != c:
                assert weight[c, j].item() == 0.0
            else:
                assert weight[c, j].item() >= 0.0


@pytest.mark.parametrize("name", [b for b in BACKBONES if b != "tiny"])
def test_each_torchvision_backbone_builds_and_runs_at_stride_32(name):
    torch.manual_seed(0)
    model = CIPL(CLASSES, backbone=name, prototype_dim=16, prototypes_per_class=1).eval()
    with torch.no_grad():
        output = model(torch.randn(1, 3, 64, 64))
    assert output.features.shape == (1, 16, 2, 2)
    assert output.logits.shape == (1, 4)
    assert torch.isfinite(output.logits).all()


def test_densenet_features_end_at_the_last_dense_block():
    body, channels = build_backbone("densenet121")
    assert channels == 1024
    names = [type(module).__name__ for module in body]
    assert names[-1] == "_DenseBlock"


def test_pretrained_path_missing_file_gives_clear_error():
    from model import PretrainedWeightsUnavailable

    with pytest.raises(PretrainedWeightsUnavailable, match="no such file"):
        build_backbone("resnet18", pretrained_path="/nonexistent/weights.pth")


def test_pretrained_path_loads_weights(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    body, _ = build_backbone("resnet18", pretrained_path=str(path))
    torch.testing.assert_close(body[0].weight, reference.conv1.weight)


def test_ema_teacher_update_rule_and_buffers():
    torch.manual_seed(3)
    student = tiny_model()
    teacher = EmaTeacher(student, decay=0.9)
    before = {name: value.clone() for name, value in teacher.module.named_parameters()}
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    student.backbone[1].running_mean.fill_(5.0)
    teacher.update(student)
    for name, value in teacher.module.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(student.named_parameters())[name]
        torch.testing.assert_close(value, expected)
        assert not value.requires_grad
    assert torch.equal(teacher.module.backbone[1].running_mean, student.backbone[1].running_mean)


def test_pretrained_download_failure_says_how_to_supply_weights(monkeypatch):
    import urllib.error

    import torchvision

    from model import PretrainedWeightsUnavailable

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(PretrainedWeightsUnavailable, match=r"--pretrained-path FILE") as error:
        build_backbone("resnet18", pretrained=True)
    assert "resnet18-" in str(error.value) and "\n" not in str(error.value)


def test_pretrained_path_accepts_torchvision_densenet_files_with_old_key_names(tmp_path):
    import re

    import torchvision

    reference = torchvision.models.densenet121(weights=None)
    # The published file spells "norm1" as "norm.1" (and so on), as torchvision's own loader expects.
    old_style = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))(\d)", r"\1.\2", key): value
                 for key, value in reference.state_dict().items()}
    assert any(".norm.1." in key for key in old_style)
    path = tmp_path / "densenet121.pth"
    torch.save(old_style, path)
    body, _ = build_backbone("densenet121", pretrained_path=str(path))
    torch.testing.assert_close(body[0].weight, reference.features.conv0.weight)
    torch.testing.assert_close(body[4].denselayer1.norm1.weight, reference.features.denseblock1.denselayer1.norm1.weight)


def test_logits_stay_float32_under_autocast():
    torch.manual_seed(0)
    model = tiny_model().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(torch.randn(2, 3, 64, 64))
    assert output.logits.dtype == torch.float32 and output.min_distances.dtype == torch.float32


def _linear_copy(module: torch.nn.Module) -> torch.nn.Module:
    """The same layers with ReLU dropped and max- turned into average-pooling: a linear network whose
    gradient reaches every pixel of the theoretical receptive field (max-pooling and dead ReLUs would
    cut it short)."""
    module = copy.deepcopy(module).eval()
    for name, child in module.named_children():
        if isinstance(child, torch.nn.ReLU):
            setattr(module, name, torch.nn.Identity())
        elif isinstance(child, torch.nn.MaxPool2d):
            setattr(module, name, torch.nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
        else:
            setattr(module, name, _linear_copy(child))
    return module


def _receptive_field_centre_row(backbone: torch.nn.Module, height: int, width: int, row: int) -> float:
    """Pixel row (of pixel centres) in the middle of the rows that feature-map row ``row`` depends on."""
    image = torch.randn(1, 3, height, width, requires_grad=True)
    output = backbone(image)
    output[0, :, row, output.shape[-1] // 2].sum().backward()
    rows = torch.nonzero(image.grad.abs().sum(dim=(0, 1, 3)) > 0).flatten()
    return (float(rows.min()) + float(rows.max())) / 2 + 0.5


def test_every_backbone_has_a_cell_grid():
    assert set(BACKBONE_GRID) == set(BACKBONES)


@pytest.mark.parametrize("name, height, width", [
    ("tiny", 128, 128), ("resnet18", 704, 96), ("resnet50", 704, 96), ("densenet121", 3200, 96),
])
def test_cell_grid_puts_each_cell_at_the_centre_of_its_receptive_field(name, height, width):
    """CIPL.cell_grid against the gradient of a linearised copy of the backbone, far from the border."""
    torch.manual_seed(0)
    backbone = _linear_copy(build_backbone(name)[0])
    stride = BACKBONE_GRID[name][0]
    row = height // stride // 2
    grid = CIPL(CLASSES, backbone=name, prototype_dim=8, prototypes_per_class=1).cell_grid(height)
    assert _receptive_field_centre_row(backbone, height, width, row) == grid.centres(row, height)
    if name == "tiny":  # 3.5 px above the centre of the cell's equal slice of the image, as the docstring says
        assert grid.centres(row, height) == CellGrid.equal_slices(height // stride, height).centres(row, height) - 3.5
