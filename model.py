"""The CIPL network: backbone -> top layer -> add-on -> prototypes -> class-identity last layer.

Follows METHOD.md "Architecture". The forward pass returns a :class:`CIPLOutput` whose fields the
losses take by name. The EMA teacher is a separate :class:`EmaTeacher` object, updated explicitly
after each optimizer step (never as a side effect of ``forward``).
"""
from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from data.registry import class_names_for

logger = logging.getLogger(__name__)

BACKBONES = ("densenet121", "resnet18", "resnet34", "resnet50", "tiny")


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights could not be downloaded or read."""


@dataclass
class CIPLOutput:
    """Everything one forward pass produces, by name.

    logits:          [N, K] class logits, No Finding last.
    min_distances:   [N, P] squared distance of each prototype to its nearest patch.
    similarity_maps: [N, P, H, W] exp(-d/D) for every patch.
    features:        [N, D, H, W] add-on features z in [0, 1].
    """

    logits: Tensor
    min_distances: Tensor
    similarity_maps: Tensor
    features: Tensor
    cross_logits: Tensor | None = None  # [2B, K] logits of the co-attended features, with co_attend=True


@dataclass(frozen=True)
class CellGrid:
    """Where the cells of a feature map lie in the image the network saw.

    Along each axis, cell k's receptive field is centred at ``first + k * step`` pixels of a square
    ``frame``-pixel image (pixel i covers [i, i + 1), so pixel i's centre is at i + 0.5). Plain
    resizing of a map instead takes cell k to be the k-th of equal slices, centred at
    ``(k + 0.5) * step`` (:meth:`equal_slices`). That is not where the cells of these backbones look:
    their 3 x 3, stride-2 convolutions centre output j on input pixel 2j, so cell k of the stride-8
    tiny network is centred on pixel 8k, 3.5 px above and left of its slice's centre, a ResNet's 15.5
    px and DenseNet-121's 1.5 px (:data:`BACKBONE_GRID`).
    """

    first: float
    step: float
    frame: int

    @classmethod
    def equal_slices(cls, cells: int, frame: int) -> "CellGrid":
        step = frame / cells
        return cls(step / 2, step, frame)

    def centres(self, cells, length: float):
        """Pixel positions of cell indices ``cells`` (array or tensor) along an axis ``length`` pixels
        long (the frame, or the same image at another size)."""
        return (self.first + cells * self.step) * (length / self.frame)


# Per backbone: (stride, index of the pixel on which the first cell's receptive field is centred). A
# layer with a k-wide kernel, stride s and padding p centres its output j on input position
# s * j + (k - 1) / 2 - p. That is 0 for every 3 x 3 / padding 1, 7 x 7 / padding 3 and 1 x 1 /
# padding 0 layer here, and +0.5 for each of DenseNet's 2 x 2 average-pooling transitions, which come
# at strides 4, 8 and 16: 0.5 x (4 + 8 + 16) = 14 pixels.
BACKBONE_GRID = {
    "densenet121": (32, 14.0), "resnet18": (32, 0.0), "resnet34": (32, 0.0), "resnet50": (32, 0.0), "tiny": (8, 0.0),
}


class TinyBackbone(nn.Sequential):
    """A small stride-8 CNN for CPU runs (the synthetic preset) and tests.

    Three stages, each a stride-2 3x3 conv and a stride-1 3x3 conv (BatchNorm, ReLU), then one more
    3x3 conv: a 128-px image gives a 16x16 feature map whose cells each see a 59-px window, so where
    a prototype matches says where its evidence lies. Padding reflects the image instead of adding
    zeros: a zero border would tell every cell how far it is from the edge, a position code the
    network could use in place of what the cell actually shows.
    """

    STRIDE = 8
    RECEPTIVE_FIELD = 59  # 1 + sum over the 3x3 convs of 2 x (product of the strides before it)

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64)):
        layers: list[nn.Module] = []
        channels_in = 3
        strides = [stride for _ in widths for stride in (2, 1)] + [1]
        outputs = [width for width in widths for _ in (0, 1)] + [widths[-1]]
        for stride, width in zip(strides, outputs):
            layers += [nn.Conv2d(channels_in, width, 3, stride=stride, padding=1, padding_mode="reflect", bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels_in = width
        super().__init__(*layers)
        self.out_channels = widths[-1]


def _torchvision_weights(name: str):
    return torchvision.models.get_model_weights(name).DEFAULT


def build_backbone(name: str, pretrained: bool = False, pretrained_path: str = "") -> tuple[nn.Module, int]:
    """A feature extractor and its channel count.

    DenseNet-121: output of the last dense block (1024 channels), as in the paper. ResNets: layer4.
    Both have stride 32; the CPU backbone ``tiny`` has stride 8 (:class:`TinyBackbone`).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if name == "tiny":
        if pretrained or pretrained_path:
            raise ValueError("the 'tiny' test backbone has no pretrained weights")
        net = TinyBackbone()
        return net, net.out_channels

    network = getattr(torchvision.models, name)(weights=None)
    if pretrained_path:
        state = _modern_key_names(_read_weights_file(pretrained_path))
        missing, unexpected = network.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
        if missing:
            raise PretrainedWeightsUnavailable(
                f"{pretrained_path} does not hold {name} weights (missing e.g. {missing[0]})"
            )
        logger.info("loaded %s weights from %s", name, pretrained_path)
    elif pretrained:
        weights = _torchvision_weights(name)
        try:
            network.load_state_dict(_modern_key_names(weights.get_state_dict(progress=True)))
        except Exception as error:  # offline machines raise URLError, OSError, ...
            raise PretrainedWeightsUnavailable(
                f"could not download ImageNet weights for {name} ({type(error).__name__}: {error}). "
                f"Offline? Download {weights.url} on a connected machine and pass "
                f"--pretrained-path FILE (or train from scratch with --no-pretrained)."
            ) from error
        logger.info("loaded torchvision ImageNet weights for %s", name)

    if name.startswith("densenet"):
        features = network.features
        # Stop at the last dense block, leaving out the final norm5 (METHOD.md).
        body = nn.Sequential(*[module for key, module in features.named_children() if key != "norm5"])
        return body, network.classifier.in_features
    body = nn.Sequential(
        network.conv1, network.bn1, network.relu, network.maxpool,
        network.layer1, network.layer2, network.layer3, network.layer4,
    )
    return body, network.fc.in_features


# torchvision's published DenseNet files use the old layer names "norm.1", "conv.2", ...; the
# modules are now "norm1", "conv2", ....
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _modern_key_names(state: dict) -> dict:
    renamed = {}
    for key, value in state.items():
        match = _OLD_DENSENET_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def _read_weights_file(path: str) -> dict:
    if not Path(path).is_file():
        raise PretrainedWeightsUnavailable(f"--pretrained-path {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PretrainedWeightsUnavailable(f"--pretrained-path {path}: not a PyTorch weights file ({error})") from error
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PretrainedWeightsUnavailable(f"--pretrained-path {path}: expected a state dict")
    return state


def squared_distances(features: Tensor, prototypes: Tensor) -> Tensor:
    """||z(h,w) - p_j||^2 for every patch and prototype, clamped at 0.

    features [N, D, H, W], prototypes [P, D] -> [N, P, H, W]. Expanded as ||z||^2 - 2 z.p + ||p||^2 so
    the N x D x H x W x P difference tensor is never built. Computed in float32 even under autocast:
    the expansion subtracts numbers of similar size and half precision would lose the small distances
    that decide push and the similarity maps.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        dtype = torch.promote_types(features.dtype, torch.float32)  # float64 stays float64
        features = features.to(dtype)
        prototypes = prototypes.to(dtype)
        feature_norms = features.pow(2).sum(dim=1, keepdim=True)  # [N, 1, H, W]
        prototype_norms = prototypes.pow(2).sum(dim=1).view(1, -1, 1, 1)  # [1, P, 1, 1]
        cross = torch.einsum("ndhw,pd->nphw", features, prototypes)
        return (feature_norms - 2 * cross + prototype_norms).clamp_min(0)


def paired_similarity_maps(features: Tensor, prototypes: Tensor, prototype_dim: int) -> Tensor:
    """exp(-||z_i(h,w) - p_i||^2 / D) of prototype i on feature map i only (not every pair), in float64.

    features [q, D, h, w], prototypes [q, D] -> [q, h, w]: each prototype's map on its own source
    image, as the galleries draw it and grounding scores it. float64, because near-equal distances
    (an untrained or saturated add-on) must not all round to similarity 1.0 and leave a flat map.
    """
    features, prototypes = features.double(), prototypes.to(features.device).double()
    distances = (features - prototypes[:, :, None, None]).pow(2).sum(dim=1)
    return torch.exp(-distances / prototype_dim)


def co_attention(features_a: Tensor, features_b: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-image co-attention of METHOD.md (L_cross).

    features_a, features_b: [B, D, H, W] (pair i is features_a[i], features_b[i]).
    Returns (b-content at a's positions, a-content at b's positions), both [B, D, H, W].

    Affinity A_ik = -||z_a(i) - z_b(k)||^2. In the softmax over k the ||z_a(i)||^2 term is the same for
    every k and cancels (likewise ||z_b(k)||^2 in the softmax over i), so only the B x N x N affinity is
    built, never the B x D x N x N difference tensor.
    """
    batch, dim, height, width = features_a.shape
    flat_a = features_a.flatten(2)  # [B, D, Na]
    flat_b = features_b.flatten(2)  # [B, D, Nb]
    with torch.autocast(device_type=features_a.device.type, enabled=False):
        dtype = torch.promote_types(flat_a.dtype, torch.float32)
        flat_a32, flat_b32 = flat_a.to(dtype), flat_b.to(dtype)
        dot = torch.bmm(flat_a32.transpose(1, 2), flat_b32)  # [B, Na, Nb]
        norms_a = flat_a32.pow(2).sum(1)  # [B, Na]
        norms_b = flat_b32.pow(2).sum(1)  # [B, Nb]
        attend_to_b = torch.softmax(2 * dot - norms_b.unsqueeze(1), dim=2)  # rows: a-positions
        attend_to_a = torch.softmax(2 * dot - norms_a.unsqueeze(2), dim=1)  # columns: b-positions
        b_at_a = torch.bmm(flat_b32, attend_to_b.transpose(1, 2))  # [B, D, Na]
        a_at_b = torch.bmm(flat_a32, attend_to_a)  # [B, D, Nb]
    return (
        b_at_a.view(batch, dim, height, width).to(features_a.dtype),
        a_at_b.view(batch, dim, *features_b.shape[2:]).to(features_b.dtype),
    )


class CIPL(nn.Module):
    """Prototype network of METHOD.md with the No-Finding reference head."""

    def __init__(
        self,
        class_names: list[str] | tuple[str, ...],
        backbone: str = "densenet121",
        prototype_dim: int = 256,
        prototypes_per_class: int = 50,
        pretrained: bool = False,
        pretrained_path: str = "",
    ):
        super().__init__()
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.num_diseases = self.num_classes - 1
        self.no_finding_index = self.num_classes - 1
        self.prototype_dim = prototype_dim
        self.prototypes_per_class = prototypes_per_class
        self.num_prototypes = prototypes_per_class * self.num_classes
        self.backbone_name = backbone

        self.backbone, backbone_channels = build_backbone(backbone, pretrained, pretrained_path)
        self.top_layer = nn.Conv2d(backbone_channels, prototype_dim, kernel_size=1)
        nn.init.kaiming_normal_(self.top_layer.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.top_layer.bias)
        self.add_on = nn.Sequential(
            nn.Conv2d(prototype_dim, prototype_dim, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(prototype_dim, prototype_dim, kernel_size=1),
            nn.Sigmoid(),
        )
        for layer in self.add_on:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Parameter(torch.rand(self.num_prototypes, prototype_dim))
        self.last_layer = nn.Linear(self.num_prototypes, self.num_classes, bias=False)

        prototype_class = torch.arange(self.num_prototypes) // prototypes_per_class
        self.register_buffer("prototype_class", prototype_class)
        self.register_buffer("class_identity", F.one_hot(prototype_class, self.num_classes).T.float())
        self.last_layer.weight.data.copy_(self.class_identity)
        # Prototype provenance lives in the state dict so a checkpoint explains itself:
        # the training image (dataset index) and feature-map location each prototype was pushed onto.
        self.register_buffer("prototype_source_index", torch.full((self.num_prototypes,), -1, dtype=torch.long))
        self.register_buffer("prototype_source_location", torch.full((self.num_prototypes, 2), -1, dtype=torch.long))
        self.register_buffer("prototype_source_distance", torch.full((self.num_prototypes,), float("nan")))

    # -- parameter groups ----------------------------------------------------------------------
    def cell_grid(self, image_size: int) -> CellGrid:
        """Where this model's feature-map cells lie in an ``image_size`` input (:class:`CellGrid`)."""
        stride, first_pixel = BACKBONE_GRID[self.backbone_name]
        return CellGrid(first=first_pixel + 0.5, step=float(stride), frame=image_size)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.top_layer.parameters())

    def add_on_parameters(self) -> list[nn.Parameter]:
        return list(self.add_on.parameters())

    @property
    def is_pushed(self) -> bool:
        return bool((self.prototype_source_index >= 0).all())

    # -- forward -------------------------------------------------------------------------------
    def extract_features(self, images: Tensor) -> Tensor:
        """images [N, 3, S, S] -> z [N, D, S/32, S/32] in [0, 1]."""
        return self.add_on(self.top_layer(self.backbone(images)))

    def classify_features(self, features: Tensor) -> CIPLOutput:
        distances = squared_distances(features, self.prototypes)
        similarity_maps = torch.exp(-distances / self.prototype_dim)
        min_distances = distances.flatten(2).amin(dim=2)
        scores = torch.exp(-min_distances / self.prototype_dim)
        # Logits are sums of M scores (~M); half precision's spacing there (0.25 for bf16 at 50)
        # would erase the margins l_c - l_NF, so the last layer stays in float32 under autocast.
        with torch.autocast(device_type=scores.device.type, enabled=False):
            logits = F.linear(scores, self.last_layer.weight.to(scores.dtype))
        return CIPLOutput(logits=logits, min_distances=min_distances, similarity_maps=similarity_maps, features=features)

    def forward(self, images: Tensor, co_attend: bool = False) -> CIPLOutput:
        """images [N, 3, S, S]. With ``co_attend`` the batch is B pairs (anchors [0:B], partners
        [B:2B]) and the output also carries the logits of the co-attended features (L_cross): b's
        content at a's positions for rows [0:B], a's content at b's positions for rows [B:2B].
        Everything that needs gradients happens inside this one call, so DistributedDataParallel
        sees the whole computation."""
        output = self.classify_features(self.extract_features(images))
        if co_attend:
            half = images.shape[0] // 2
            b_at_a, a_at_b = co_attention(output.features[:half], output.features[half:])
            output.cross_logits = self.classify_features(torch.cat([b_at_a, a_at_b])).logits
        return output

    @torch.no_grad()
    def forget_provenance(self) -> None:
        """Prototypes are about to be trained again: they will no longer be their source patches."""
        self.prototype_source_index.fill_(-1)
        self.prototype_source_location.fill_(-1)
        self.prototype_source_distance.fill_(float("nan"))

    @torch.no_grad()
    def constrain_last_layer(self) -> None:
        """Last-layer stage rule: off-class weights 0, own-class weights >= 0."""
        self.last_layer.weight.mul_(self.class_identity).clamp_(min=0)

    def description(self) -> dict:
        """What a checkpoint must match to be loaded into this model."""
        return dict(
            class_names=self.class_names,
            backbone=self.backbone_name,
            prototype_dim=self.prototype_dim,
            prototypes_per_class=self.prototypes_per_class,
        )


def disease_probabilities(logits: Tensor) -> Tensor:
    """P(c) = softmax([l_NF, l_c])[1] = sigmoid(l_c - l_NF) for the C diseases: [N, K] -> [N, C]."""
    return torch.sigmoid(logits[:, :-1] - logits[:, -1:])


def build_model(config, load_pretrained: bool = True) -> CIPL:
    """The network a config describes. ``load_pretrained=False`` when a checkpoint's weights will be
    loaded into it anyway (resume, evaluation): no ImageNet download, so it works offline."""
    return CIPL(
        class_names_for(config),
        backbone=config.backbone,
        prototype_dim=config.prototype_dim,
        prototypes_per_class=config.prototypes_per_class,
        pretrained=config.pretrained and load_pretrained,
        pretrained_path=config.pretrained_path if load_pretrained else "",
    )


class EmaTeacher:
    """Exponential-moving-average copy of the student (METHOD.md "EMA teacher").

    Updated explicitly after each optimizer step: theta_t <- decay * theta_t + (1 - decay) * theta_s,
    buffers (BatchNorm statistics, provenance) copied. Never receives gradients.
    """

    def __init__(self, student: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.module = copy.deepcopy(student).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        teacher_params = list(self.module.parameters())
        student_params = [p.detach() for p in student.parameters()]
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - self.decay)
        for teacher_buffer, student_buffer in zip(self.module.buffers(), student.buffers()):
            teacher_buffer.copy_(student_buffer)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> CIPLOutput:
        return self.module(images)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)

    def to(self, device) -> "EmaTeacher":
        self.module.to(device)
        return self
