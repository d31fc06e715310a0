"""Procedural chest-X-ray-like multi-label data: the project's offline, end-to-end proving ground.

Why it exists: the real datasets (NIH ChestX-ray14, ODIR) are large downloads, yet every part of the
pipeline (class-balanced pair sampling, co-attention, push, weakly-supervised localisation) needs data
with the same *structure* to be exercised in tests and smoke runs. A case here is a pure function of
one integer seed, so a dataset is a pure function of (split seed, split, index) and needs no files.

What makes it a fair test of CIPL rather than a toy any model aces:

- Each disease has its own *local* appearance at a random place and size, with a ground-truth box,
  so localisation can be scored the way the NIH BBox list is scored.
- Lesion contrast varies per case down to the noise floor, and anatomy, exposure and gamma vary per
  image, so accuracy does not saturate.
- Diseases co-occur the way they do in NIH: effusion with cardiomegaly (heart failure), mass with
  nodule (malignancy), atelectasis with effusion (compressed lung). A classifier can then score well
  on a disease by recognising its *companion*, and its evidence maps point at the wrong lesion.
  CIPL's cross-image common-semantics loss claims to undo exactly this, so the correlation is the
  point. Every disease also appears alone, otherwise no method could tell the partners apart.

Geometry is sampled in fractions of the image side before any pixel is drawn, so the same seed gives
the same labels and (up to pixel rounding) the same scaled boxes at every image size. Coordinates are
x to the right, y down; pixel ``i`` covers ``[i, i + 1)`` and its centre is at ``(i + 0.5) / size``.
Layers are composed as radiographic *density* (bright = attenuating), then mapped through a per-image
exposure curve, as a detector would.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "CO_OCCURRING_DISEASES",
    "SYNTHETIC_DISEASES",
    "SYNTHETIC_CLASS_NAMES",
    "SyntheticCase",
    "case_seed",
    "disease_prevalence",
    "render_case",
]

SYNTHETIC_DISEASES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Mass",
    "Nodule",
    "Pneumothorax",
)
SYNTHETIC_CLASS_NAMES: tuple[str, ...] = SYNTHETIC_DISEASES + ("No Finding",)

_ATELECTASIS, _CARDIOMEGALY, _EFFUSION, _MASS, _NODULE, _PNEUMOTHORAX = range(len(SYNTHETIC_DISEASES))
_NO_FINDING = len(SYNTHETIC_DISEASES)

# The decorrelated test split draws every disease independently (see `render_case`); its own code
# keeps its cases apart from the ordinary test split's.
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "test-decorrelated": 3}
_MIN_IMAGE_SIZE = 32

# Disease model. A case is normal with _NORMAL_SHARE; otherwise one primary disease is drawn, its
# clinical companions follow with the probabilities below, and rarely one unrelated incidental finding
# is added. With these numbers every disease has a prevalence of roughly 10-20 %, P(Cardiomegaly |
# Effusion) and P(Nodule | Mass) are about 0.6, and every disease is the only finding in a few percent
# of cases. The numbers are loosely NIH-shaped; nothing is tuned for any particular model.
_NORMAL_SHARE = 0.40
_PRIMARY_PROBABILITIES = np.array([0.15, 0.18, 0.18, 0.14, 0.18, 0.17])
_COMPANIONS: dict[int, tuple[tuple[int, float], ...]] = {
    _ATELECTASIS: ((_EFFUSION, 0.30),),
    _CARDIOMEGALY: ((_EFFUSION, 0.35),),
    _EFFUSION: ((_CARDIOMEGALY, 0.65), (_ATELECTASIS, 0.30)),
    _MASS: ((_NODULE, 0.55),),
    _NODULE: ((_MASS, 0.25),),
    _PNEUMOTHORAX: (),
}
_INCIDENTAL_PROBABILITY = 0.08
# Patient positioning: the chest is shifted by up to this share of the side and zoomed by up to
# this factor either way (a few centimetres and a few percent of film distance on a real radiograph).
_POSE_SHIFT = 0.08
_POSE_ZOOM = 0.08
_MAX_DISEASES = 3
# Lesion sizes, in fractions of the side. The grounding score asks a prototype's 95th-percentile region
# (5 % of the image) to lie half inside a box of its class, so a lesion box under 2.5 % of the image can
# never count; masses and nodule clusters are drawn large enough to be scored (real nodules are smaller,
# which `grounding_reachable` reports on real data).
_MASS_RADIUS = (0.08, 0.12)
_NODULE_COUNT = (4, 6)  # nodules per cluster
_NODULE_CLUSTER_SPREAD = (0.11, 0.15)  # radius of the disc the cluster's nodules are scattered over
# Thin plate-like bands stay, but as the rarer form of atelectasis: their boxes (about 1 % of the image)
# are below what can be scored, while a segmental wedge's box is not.
_ATELECTASIS_BAND_SHARE = 0.3
# Lesion contrast = low + (high - low) * u ** skew with u uniform. The low end reaches the noise floor
# either way; a skew of 1.5 put nearly two thirds of the lesions in the lower half, and the 2-core budget's
# ~600 steps then ended with the network still learning in most runs (a plain CNN of the same backbone
# reached validation AUC 0.76 after 150 steps at skew 1, 0.62 at skew 1.5, one seed).
_SEVERITY_SKEW = 1.0
# The two strongly co-occurring pairs (P(companion | disease) about 0.6): where a classifier can score by
# recognising the companion, and where CIPL's cross-image term claims to help.
CO_OCCURRING_DISEASES: tuple[str, ...] = ("Cardiomegaly", "Effusion", "Mass", "Nodule")


@dataclass(frozen=True)
class SyntheticCase:
    """One rendered case.

    image: uint8 (size, size) grey radiograph.
    target: float32 (K,) multi-hot over SYNTHETIC_CLASS_NAMES; the last column is 1 iff no disease.
    boxes: (class_index, x, y, w, h) in pixels, top-left origin, one per lesion (a nodule cluster
        has one box around all its nodules); empty for a normal case.
    pose: (shift_x, shift_y, scale) of the patient in the field: the centred scene is zoomed by scale
        about the image centre and shifted by shift x size pixels (boxes already include it).
    """

    image: np.ndarray
    target: np.ndarray
    boxes: tuple[tuple[int, float, float, float, float], ...]
    pose: tuple[float, float, float] = (0.0, 0.0, 1.0)


def case_seed(split_seed: int, split: str, index: int) -> int:
    """Deterministic, well-mixed seed for case `index` of split 'train'|'val'|'test'.

    SeedSequence hashes (split_seed, split, index) thoroughly, so neighbouring indices get unrelated
    streams; the split code in the two low bits makes seeds of different splits distinct by
    construction, not merely with high probability. No Python `hash()`: it is salted per process.
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    split_seed = operator.index(split_seed)
    index = operator.index(index)
    if split_seed < 0 or index < 0:
        raise ValueError(f"split_seed and index must be non-negative, got {split_seed}, {index}")
    code = _SPLIT_CODES[split]
    high, low = np.random.SeedSequence([split_seed, code, index]).generate_state(2, dtype=np.uint32)
    mixed = ((int(high) << 32) | int(low)) >> 2
    return (mixed << 2) | code


# --------------------------------------------------------------------------------------------------
# Scene description: fractions of the image side, sampled before any pixel exists


@dataclass(frozen=True)
class _Ellipse:
    center_x: float
    center_y: float
    semi_x: float
    semi_y: float
    angle_deg: float = 0.0  # clockwise on screen, as in cv2.ellipse

    def bounds(self) -> tuple[float, float, float, float]:
        """Axis-aligned (x0, y0, x1, y1) of the rotated ellipse."""
        theta = math.radians(self.angle_deg)
        half_w = math.hypot(self.semi_x * math.cos(theta), self.semi_y * math.sin(theta))
        half_h = math.hypot(self.semi_x * math.sin(theta), self.semi_y * math.cos(theta))
        return (self.center_x - half_w, self.center_y - half_h, self.center_x + half_w, self.center_y + half_h)


@dataclass(frozen=True)
class _Lung:
    """A lung field: an ellipse widened towards the base, with the diaphragm dome pushed up into it.

    The dome leaves deep lateral costophrenic recesses, which is where small effusions collect.
    """

    outline: _Ellipse
    medial_sign: int  # +1 if the mediastinum is to the right of this lung on screen
    base_widening: float
    diaphragm: _Ellipse

    def point(self, radius: float, angle: float) -> tuple[float, float]:
        """The point at normalised polar coordinates inside the outline ellipse."""
        e = self.outline
        return (e.center_x + radius * e.semi_x * math.cos(angle), e.center_y + radius * e.semi_y * math.sin(angle))

    def contains(self, x: float, y: float, margin: float = 0.0) -> bool:
        """Whether (x, y) lies in the aerated lung, at least `margin` (in units of the semi-axes) inside."""
        e, dome = self.outline, self.diaphragm
        vertical = (y - e.center_y) / e.semi_y
        half_width = e.semi_x * (1.0 + self.base_widening * min(max(vertical, -1.0), 1.0))
        in_outline = math.hypot((x - e.center_x) / half_width, vertical) < 1.0 - margin
        above_dome = math.hypot((x - dome.center_x) / dome.semi_x, (y - dome.center_y) / dome.semi_y) > 1.0 + margin
        return in_outline and above_dome

    def sample_point(self, rng: np.random.Generator, max_radius: float, margin: float = 0.1) -> tuple[float, float]:
        """A uniform point of the outline's inner `max_radius` that is also clear of the diaphragm."""
        for _ in range(32):
            point = self.point(max_radius * math.sqrt(rng.random()), rng.uniform(0.0, 2.0 * math.pi))
            if self.contains(*point, margin=margin):
                return point
        return self.point(0.4, -0.5 * math.pi)  # upper zone: always inside; practically never reached

    @property
    def hilum(self) -> tuple[float, float]:
        e = self.outline
        return (e.center_x + self.medial_sign * 0.55 * e.semi_x, e.center_y + 0.05 * e.semi_y)

    def bounds(self) -> tuple[float, float, float, float]:
        e = self.outline
        half_width = e.semi_x * (1.0 + self.base_widening)
        return (e.center_x - half_width, e.center_y - e.semi_y, e.center_x + half_width, e.center_y + e.semi_y)


@dataclass(frozen=True)
class _Anatomy:
    body: _Ellipse
    lungs: tuple[_Lung, _Lung]  # screen-left (patient's right) first
    heart: _Ellipse
    midline: float
    carina_y: float
    soft_tissue: float
    lung_depth: float
    heart_density: float
    mediastinum_density: float
    trachea_depth: float
    rib_first_y: float
    rib_spacing: float
    rib_drop: float
    rib_reach: float
    rib_thickness: float
    rib_amplitude: float
    clavicle_y: float
    clavicle_amplitude: float
    vessels: np.ndarray  # (n, 5) segments: x0, y0, x1, y1, calibre (relative)
    vessel_amplitude: float


@dataclass(frozen=True)
class _Pose:
    """Where the patient stands in the field: a shift (fractions of the side) and a zoom about the centre."""

    shift_x: float
    shift_y: float
    scale: float

    def apply(self, x: float, y: float, size: int) -> tuple[float, float]:
        """A point (pixels, our convention) of the centred scene -> where it appears in the image."""
        centre = 0.5 * size
        return centre + self.scale * (x - centre) + self.shift_x * size, centre + self.scale * (y - centre) + self.shift_y * size


@dataclass(frozen=True)
class _Exposure:
    gamma: float
    contrast: float
    brightness: float
    noise_sigma: float
    shading: np.ndarray  # (3, 3) cosine coefficients: uneven exposure and body habitus
    shading_amplitude: float


@dataclass(frozen=True)
class _AtelectasisPlan:
    lung_index: int
    band: _Ellipse | None  # plate-like (discoid) atelectasis
    wedge: tuple[tuple[float, float], ...] | None  # segmental collapse: apex to the hilum, base on the pleura
    contrast: float


@dataclass(frozen=True)
class _EffusionPlan:
    lung_index: int
    fluid_height: float  # fraction of the lung height, measured up from the lowest point of the lung
    meniscus_rise: float  # extra height of the fluid at the lateral chest wall (fraction of the image)
    density_ramp: float  # the fluid shadow deepens over this distance below its surface
    fill: float  # 1 = as dense as soft tissue


@dataclass(frozen=True)
class _MassPlan:
    center_x: float
    center_y: float
    radius: float
    lobulation: tuple[tuple[int, float, float], ...]  # (harmonic, relative amplitude, phase)
    texture: float
    contrast: float


@dataclass(frozen=True)
class _NodulePlan:
    centers: tuple[tuple[float, float], ...]
    radii: tuple[float, ...]
    contrasts: tuple[float, ...]


@dataclass(frozen=True)
class _PneumothoraxPlan:
    lung_index: int
    collapse_x: float  # remaining lung width / original width
    collapse_y: float
    darkness: float
    pleural_line: float


def _severity(rng: np.random.Generator, low: float, high: float) -> float:
    """Lesion contrast between low and high (see _SEVERITY_SKEW); the low end sits near the noise floor."""
    return low + (high - low) * float(rng.random()) ** _SEVERITY_SKEW


@functools.cache
def disease_prevalence() -> np.ndarray:
    """Exact probability of each disease under the clinical (correlated) disease model: [C].

    Enumerates the model of `_sample_diseases`: a primary disease, each subset of its companions, then
    the incidental finding, which joins with _INCIDENTAL_PROBABILITY when fewer than _MAX_DISEASES are
    present and is uniform over the diseases not yet present.
    """
    count = len(SYNTHETIC_DISEASES)
    prevalence = np.zeros(count)
    for primary, primary_probability in enumerate(_PRIMARY_PROBABILITIES):
        companions = _COMPANIONS[primary]
        for mask in range(2 ** len(companions)):  # every subset of the companions (at most 2 of them)
            present, probability = {primary}, (1.0 - _NORMAL_SHARE) * primary_probability
            for bit, (companion, companion_probability) in enumerate(companions):
                chosen = bool(mask >> bit & 1)
                probability *= companion_probability if chosen else 1.0 - companion_probability
                if chosen:
                    present.add(companion)
            prevalence[sorted(present)] += probability
            if len(present) < _MAX_DISEASES:
                others = [d for d in range(count) if d not in present]
                prevalence[others] += probability * _INCIDENTAL_PROBABILITY / len(others)
    prevalence.flags.writeable = False  # cached and shared by every caller
    return prevalence


def _sample_diseases(rng: np.random.Generator, decorrelated: bool = False) -> frozenset[int]:
    """The case's diseases. Clinical model by default; ``decorrelated``: each disease present
    independently with its prevalence under the clinical model, so the diseases that usually come
    together (effusion and cardiomegaly, mass and nodule) appear together only by chance."""
    if decorrelated:
        return frozenset(np.flatnonzero(rng.random(len(SYNTHETIC_DISEASES)) < disease_prevalence()).tolist())
    if rng.random() < _NORMAL_SHARE:
        return frozenset()
    primary = int(rng.choice(len(SYNTHETIC_DISEASES), p=_PRIMARY_PROBABILITIES))
    present = {primary}
    for companion, probability in _COMPANIONS[primary]:
        if rng.random() < probability:
            present.add(companion)
    if len(present) < _MAX_DISEASES and rng.random() < _INCIDENTAL_PROBABILITY:
        others = [d for d in range(len(SYNTHETIC_DISEASES)) if d not in present]
        present.add(others[int(rng.integers(len(others)))])
    return frozenset(present)


def _sample_vessels(rng: np.random.Generator, lungs: list[_Lung]) -> np.ndarray:
    """Pulmonary vessels: branching trees fanning out from each hilum and thinning to the periphery.

    Steps are in units of each lung's semi-axes, so the trees fill tall and wide lungs alike. Vessel
    markings are what a pneumothorax lacks and what fluid hides, so they carry diagnostic signal.
    """
    roots, steps = 8, 4
    semi = np.array([[lung.outline.semi_x, lung.outline.semi_y] for lung in lungs])[:, None, None, :]
    hila = np.array([lung.hilum for lung in lungs])[:, None, None, :]
    lateral = np.array([math.pi if lung.medial_sign > 0 else 0.0 for lung in lungs])[:, None, None]
    heading = lateral + rng.uniform(-1.7, 1.7, size=(2, roots, 1))
    heading = heading + np.cumsum(rng.normal(0.0, 0.25, size=(2, roots, steps)), axis=2)
    length = rng.uniform(0.22, 0.35, size=(2, roots, steps))[..., None]
    ends = hila + np.cumsum(length * np.stack([np.cos(heading), np.sin(heading)], axis=-1) * semi, axis=2)
    starts = np.concatenate([np.broadcast_to(hila, (2, roots, 1, 2)), ends[:, :, :-1]], axis=2)
    calibre = np.broadcast_to(np.array([1.0, 0.75, 0.55, 0.4]), (2, roots, steps))[..., None]
    # One side branch leaves every joint of each trunk.
    turn = (2 * rng.integers(0, 2, size=(2, roots, steps - 1)) - 1) * rng.uniform(0.4, 0.9, size=(2, roots, steps - 1))
    branch_heading = heading[:, :, 1:] + turn
    branch_length = rng.uniform(0.15, 0.25, size=(2, roots, steps - 1))[..., None]
    branch_direction = np.stack([np.cos(branch_heading), np.sin(branch_heading)], axis=-1)
    branch_ends = ends[:, :, :-1] + branch_length * branch_direction * semi
    trunks = np.concatenate([starts, ends, calibre], axis=-1).reshape(-1, 5)
    branches = np.concatenate([ends[:, :, :-1], branch_ends, 0.7 * calibre[:, :, 1:]], axis=-1).reshape(-1, 5)
    return np.concatenate([trunks, branches]).astype(np.float32)


def _sample_anatomy(rng: np.random.Generator, cardiomegaly: bool) -> _Anatomy:
    scale = rng.uniform(0.94, 1.04)
    midline = 0.5 + rng.uniform(-0.02, 0.02)
    base_y = 0.8 + rng.uniform(-0.03, 0.03)
    lungs = []
    for medial_sign in (1, -1):
        semi_x = rng.uniform(0.155, 0.18) * scale
        semi_y = rng.uniform(0.31, 0.34) * scale
        # The liver lifts the right hemidiaphragm, so the patient's right (screen-left) lung is shorter.
        bottom = base_y + rng.uniform(-0.01, 0.01) - (0.025 if medial_sign > 0 else 0.0)
        center_x = midline - medial_sign * (rng.uniform(0.02, 0.035) + semi_x)
        dome_top = bottom - rng.uniform(0.05, 0.08)
        dome_semi_y = rng.uniform(0.12, 0.18)
        lungs.append(
            _Lung(
                outline=_Ellipse(center_x, bottom - semi_y, semi_x, semi_y),
                medial_sign=medial_sign,
                base_widening=rng.uniform(0.1, 0.2),
                diaphragm=_Ellipse(
                    center_x + medial_sign * rng.uniform(0.1, 0.3) * semi_x,
                    dome_top + dome_semi_y,
                    semi_x * rng.uniform(1.2, 1.4),
                    dome_semi_y,
                ),
            )
        )
    # Cardiomegaly means a cardiothoracic ratio above ~0.5. Hearts here are tilted ellipses whose
    # width spans ~0.38-0.47 of the thorax when normal and ~0.49-0.6 when enlarged, so the mildest
    # enlargements sit right next to the largest normal hearts; enlarged hearts are also a little denser.
    if cardiomegaly:
        heart_semi_x = rng.uniform(0.165, 0.205)
        heart_density = rng.uniform(0.0, 0.04) + rng.uniform(0.0, 0.03)
    else:
        heart_semi_x = rng.uniform(0.125, 0.16)
        heart_density = rng.uniform(0.0, 0.04)
    heart_semi_y = heart_semi_x * rng.uniform(0.8, 0.92)
    # The heart rests on the left hemidiaphragm (screen right) and bulges towards the patient's left.
    left_dome_top = lungs[1].diaphragm.center_y - lungs[1].diaphragm.semi_y
    heart = _Ellipse(
        center_x=midline + rng.uniform(0.045, 0.07) + 0.35 * (heart_semi_x - 0.14),
        center_y=left_dome_top + 0.02 - 0.8 * heart_semi_y,
        semi_x=heart_semi_x,
        semi_y=heart_semi_y,
        angle_deg=rng.uniform(20.0, 35.0),
    )
    lung_top = min(lung.outline.center_y - lung.outline.semi_y for lung in lungs)
    return _Anatomy(
        body=_Ellipse(midline, 0.62 + rng.uniform(-0.02, 0.02), 0.5 * scale + 0.02, 0.7),
        lungs=(lungs[0], lungs[1]),
        heart=heart,
        midline=midline,
        carina_y=lung_top + rng.uniform(0.22, 0.28),
        soft_tissue=rng.uniform(0.5, 0.6),
        lung_depth=rng.uniform(0.3, 0.4),
        heart_density=heart_density,
        mediastinum_density=rng.uniform(0.04, 0.09),
        trachea_depth=rng.uniform(0.04, 0.1),
        rib_first_y=lung_top - rng.uniform(0.0, 0.03),
        rib_spacing=rng.uniform(0.06, 0.07) * scale,
        rib_drop=rng.uniform(0.1, 0.15),
        rib_reach=rng.uniform(0.33, 0.37) * scale,
        rib_thickness=rng.uniform(0.022, 0.032),
        rib_amplitude=rng.uniform(0.025, 0.06),
        clavicle_y=lung_top + rng.uniform(0.0, 0.04),
        clavicle_amplitude=rng.uniform(0.04, 0.09),
        vessels=_sample_vessels(rng, lungs),
        vessel_amplitude=rng.uniform(0.04, 0.08),
    )


def _sample_pose(rng: np.random.Generator) -> _Pose:
    """Patient positioning varies from film to film: the chest is not always centred or at the same
    distance. Without this every lesion class would sit on the same few pixels of every image, and a
    map could point at a disease from its usual position alone, without looking at the image."""
    return _Pose(shift_x=rng.uniform(-_POSE_SHIFT, _POSE_SHIFT), shift_y=rng.uniform(-_POSE_SHIFT, _POSE_SHIFT),
                 scale=rng.uniform(1.0 - _POSE_ZOOM, 1.0 + _POSE_ZOOM))


def _apply_pose(density: np.ndarray, pose: _Pose, size: int) -> np.ndarray:
    """Warp the centred scene to the patient's pose; what enters at the edges repeats the border."""
    # cv2 puts pixel centres at integers, this module at i + 0.5: the offset accounts for both.
    offset_x = (1.0 - pose.scale) * (0.5 * size - 0.5) + pose.shift_x * size
    offset_y = (1.0 - pose.scale) * (0.5 * size - 0.5) + pose.shift_y * size
    matrix = np.array([[pose.scale, 0.0, offset_x], [0.0, pose.scale, offset_y]], dtype=np.float64)
    return cv2.warpAffine(density, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _pose_box(box: _Box, pose: _Pose, size: int) -> _Box:
    """A lesion box of the centred scene, moved with the patient and clipped to the image."""
    x, y, w, h = box
    left, top = pose.apply(x, y, size)
    right, bottom = pose.apply(x + w, y + h, size)
    left, top = min(max(left, 0.0), size - 1.0), min(max(top, 0.0), size - 1.0)
    right, bottom = min(max(right, left + 1.0), float(size)), min(max(bottom, top + 1.0), float(size))
    return (left, top, right - left, bottom - top)


def _sample_exposure(rng: np.random.Generator) -> _Exposure:
    return _Exposure(
        gamma=math.exp(rng.uniform(math.log(0.75), math.log(1.35))),
        contrast=rng.uniform(0.8, 1.2),
        brightness=rng.uniform(-0.07, 0.07),
        noise_sigma=rng.uniform(0.012, 0.04),
        shading=rng.uniform(-1.0, 1.0, size=(3, 3)).astype(np.float32),
        shading_amplitude=rng.uniform(0.02, 0.06),
    )


def _sample_atelectasis(rng: np.random.Generator, anatomy: _Anatomy) -> _AtelectasisPlan:
    lung_index = int(rng.integers(2))
    lung = anatomy.lungs[lung_index]
    e = lung.outline
    contrast = _severity(rng, 0.05, 0.22)
    if rng.random() < _ATELECTASIS_BAND_SHARE:
        # Plate-like atelectasis: a thin, roughly horizontal band in the mid or lower zone.
        band = _Ellipse(
            center_x=e.center_x + rng.uniform(-0.45, 0.45) * e.semi_x,
            center_y=e.center_y + rng.uniform(0.05, 0.55) * e.semi_y,
            semi_x=rng.uniform(0.35, 0.6) * e.semi_x,
            semi_y=rng.uniform(0.01, 0.022),
            angle_deg=rng.uniform(-25.0, 25.0),
        )
        return _AtelectasisPlan(lung_index, band=band, wedge=None, contrast=contrast)
    # Segmental collapse: a wedge with its apex towards the hilum and its base on the lateral/basal pleura.
    apex = (
        e.center_x + lung.medial_sign * rng.uniform(0.1, 0.4) * e.semi_x,
        e.center_y + rng.uniform(-0.2, 0.3) * e.semi_y,
    )
    direction = rng.uniform(0.0, math.radians(60.0))
    spread = rng.uniform(math.radians(12.0), math.radians(28.0))
    base = tuple(
        (
            e.center_x - lung.medial_sign * 1.05 * e.semi_x * math.cos(angle),
            e.center_y + 1.05 * e.semi_y * math.sin(angle),
        )
        for angle in (direction - spread, direction + spread)
    )
    return _AtelectasisPlan(lung_index, band=None, wedge=(apex,) + base, contrast=0.8 * contrast)


def _sample_effusion(rng: np.random.Generator) -> _EffusionPlan:
    return _EffusionPlan(
        lung_index=int(rng.integers(2)),
        fluid_height=rng.uniform(0.18, 0.45),
        meniscus_rise=rng.uniform(0.04, 0.12),
        density_ramp=rng.uniform(0.015, 0.06),
        fill=_severity(rng, 0.3, 1.0),
    )


def _sample_mass(rng: np.random.Generator, anatomy: _Anatomy) -> _MassPlan:
    lung = anatomy.lungs[int(rng.integers(2))]
    center = lung.sample_point(rng, max_radius=0.6)
    lobulation = tuple((harmonic, rng.uniform(0.0, 0.1), rng.uniform(0.0, 2.0 * math.pi)) for harmonic in (2, 3, 5))
    return _MassPlan(
        center_x=center[0],
        center_y=center[1],
        radius=rng.uniform(*_MASS_RADIUS),
        lobulation=lobulation,
        texture=rng.uniform(0.15, 0.35),
        contrast=_severity(rng, 0.05, 0.22),
    )


def _sample_nodules(rng: np.random.Generator, anatomy: _Anatomy) -> _NodulePlan:
    """A cluster of small nodules scattered over one zone of one lung (one finding, one box).

    Each nodule is only 4-9 px across at 128 px, under a fifth of a 16 x 16 map's cell neighbourhood;
    a box around a single one would be far smaller than any high-activation region a prototype can
    have, so no prototype could ever be scored grounded on it. The cluster keeps the small round
    spots that tell nodules from a mass while its box is large enough to be resolved.
    """
    lung = anatomy.lungs[int(rng.integers(2))]
    zone = lung.sample_point(rng, max_radius=0.55)
    spread = rng.uniform(*_NODULE_CLUSTER_SPREAD)
    count = int(rng.integers(_NODULE_COUNT[0], _NODULE_COUNT[1] + 1))
    centers, radii, contrasts = [], [], []
    for _ in range(count):
        center = zone
        for _ in range(32):
            distance, angle = spread * math.sqrt(rng.random()), rng.uniform(0.0, 2.0 * math.pi)
            candidate = (zone[0] + distance * math.cos(angle), zone[1] + distance * math.sin(angle))
            if lung.contains(*candidate, margin=0.05):
                center = candidate
                break
        centers.append(center)
        radii.append(rng.uniform(0.015, 0.035))
        contrasts.append(_severity(rng, 0.04, 0.24))
    return _NodulePlan(tuple(centers), tuple(radii), tuple(contrasts))


def _sample_pneumothorax(rng: np.random.Generator) -> _PneumothoraxPlan:
    collapse_x = rng.uniform(0.62, 0.9)
    return _PneumothoraxPlan(
        lung_index=int(rng.integers(2)),
        collapse_x=collapse_x,
        collapse_y=min(0.96, collapse_x + rng.uniform(-0.03, 0.08)),
        darkness=_severity(rng, 0.02, 0.12),
        pleural_line=rng.uniform(0.03, 0.1),
    )


# --------------------------------------------------------------------------------------------------
# Rendering. Shapes that cover part of the image are evaluated only inside their window.

_Window = tuple[slice, slice]  # (rows, cols)
_Box = tuple[float, float, float, float]  # (x, y, w, h) in pixels


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as a (1, size) row and a (size, 1) column, in fractions of the side."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    xs, ys = coords[None, :].copy(), coords[:, None].copy()
    xs.setflags(write=False)
    ys.setflags(write=False)
    return xs, ys


def _window(x0: float, y0: float, x1: float, y1: float, size: int, margin_px: int = 2) -> _Window:
    """Pixel slices covering the fractional box [x0, x1] x [y0, y1] plus a margin, clipped to the image."""
    cols = slice(max(0, math.floor(x0 * size) - margin_px), min(size, math.ceil(x1 * size) + margin_px))
    rows = slice(max(0, math.floor(y0 * size) - margin_px), min(size, math.ceil(y1 * size) + margin_px))
    return rows, cols


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px < 0.3:
        return image
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma_px, sigmaY=sigma_px, borderType=cv2.BORDER_REFLECT)


def _unit_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-variance noise, smoothed over `sigma_px`.

    Uniform bytes are several times cheaper to draw than normals and the Gaussian smoothing makes them
    near-normal; the variance lost to smoothing is restored from the kernel, not measured.
    """
    noise = rng.integers(0, 256, size=shape, dtype=np.uint8).astype(np.float32)
    noise -= np.float32(127.5)
    noise *= np.float32(1.0 / math.sqrt((256.0**2 - 1.0) / 12.0))
    if sigma_px < 0.3:
        return noise
    kernel = cv2.getGaussianKernel(int(2 * math.ceil(4.0 * sigma_px) + 1), sigma_px)
    noise = cv2.GaussianBlur(noise, (kernel.shape[0], kernel.shape[0]), sigma_px, borderType=cv2.BORDER_REFLECT)
    noise *= np.float32(1.0 / float(np.sum(kernel**2)))
    return noise


def _fixed_point(points: np.ndarray, size: int, origin_x: int = 0, origin_y: int = 0) -> np.ndarray:
    """Fractional (..., 2) points as cv2 fixed point with 4 fractional bits (pixel centres are integers)."""
    pixels = points * size - 0.5 - np.array([origin_x, origin_y], dtype=np.float64)
    return np.round(pixels * 16.0).astype(np.int32)


def _soft_ellipse(xs: np.ndarray, ys: np.ndarray, e: _Ellipse, edge: float) -> np.ndarray:
    """Filled ellipse whose boundary ramps over about `edge` (anti-aliased, resolution-independent)."""
    dx = xs - np.float32(e.center_x)
    dy = ys - np.float32(e.center_y)
    if e.angle_deg:
        theta = math.radians(e.angle_deg)
        cos, sin = np.float32(math.cos(theta)), np.float32(math.sin(theta))
        dx, dy = dx * cos + dy * sin, dy * cos - dx * sin
    radius = np.sqrt((dx * np.float32(1.0 / e.semi_x)) ** 2 + (dy * np.float32(1.0 / e.semi_y)) ** 2)
    return np.clip(0.5 + (1.0 - radius) * np.float32(min(e.semi_x, e.semi_y) / edge), 0.0, 1.0)


def _lung_fields(xs: np.ndarray, ys: np.ndarray, lung: _Lung, edge: float) -> tuple[np.ndarray, np.ndarray]:
    """(mask, air thickness) of a lung; the air column is thickest mid-lung and thins at the edges."""
    e = lung.outline
    vertical = (ys - np.float32(e.center_y)) * np.float32(1.0 / e.semi_y)
    half_width = np.float32(e.semi_x) * (1.0 + np.float32(lung.base_widening) * np.clip(vertical, -1.0, 1.0))
    radius_sq = ((xs - np.float32(e.center_x)) / half_width) ** 2 + vertical**2
    mask = np.clip(0.5 + (1.0 - np.sqrt(radius_sq)) * np.float32(e.semi_x / edge), 0.0, 1.0)
    mask *= 1.0 - _soft_ellipse(xs, ys, lung.diaphragm, edge)
    thickness = 0.6 + 0.4 * np.sqrt(np.clip(1.0 - radius_sq, 0.0, 1.0))
    return mask, thickness


def _mask_box(mask: np.ndarray, threshold: float, window: _Window | None = None) -> _Box | None:
    """Pixel box (x, y, w, h) of `mask >= threshold`; `window` places a patch in the image."""
    above = mask >= threshold
    columns = np.flatnonzero(above.any(axis=0))
    if columns.size == 0:
        return None
    rows = np.flatnonzero(above.any(axis=1))
    offset_y, offset_x = (window[0].start, window[1].start) if window else (0, 0)
    x0, y0 = offset_x + int(columns[0]), offset_y + int(rows[0])
    return (float(x0), float(y0), float(columns[-1] + 1 - columns[0]), float(rows[-1] + 1 - rows[0]))


def _patch_box(mask: np.ndarray, window: _Window) -> _Box:
    """Box where the lesion's shape mask reaches half of full strength (or of its peak, for a shape too
    thin to reach it at this resolution). The mask excludes contrast, so faint lesions keep their extent."""
    box = _mask_box(mask, 0.5, window)
    if box is None and float(mask.max()) > 0.0:
        box = _mask_box(mask, 0.5 * float(mask.max()), window)
    if box is None:  # nothing left inside the image: fall back to the window the lesion was drawn in
        rows, cols = window
        width, height = max(1, cols.stop - cols.start), max(1, rows.stop - rows.start)
        box = (float(cols.start), float(rows.start), float(width), float(height))
    return box


def _fraction_box(x0: float, y0: float, x1: float, y1: float, size: int) -> _Box:
    """A box given in fractions, in pixels, clipped to the image and at least one pixel wide."""
    left = min(max(x0 * size, 0.0), size - 1.0)
    top = min(max(y0 * size, 0.0), size - 1.0)
    right = min(max(x1 * size, left + 1.0), float(size))
    bottom = min(max(y1 * size, top + 1.0), float(size))
    return (left, top, right - left, bottom - top)


def _rib_cage(anatomy: _Anatomy, xs: np.ndarray, ys: np.ndarray) -> tuple[_Window, np.ndarray]:
    """Posterior ribs arc from the spine down to the lateral chest wall; fainter anterior ribs run back
    medially and downward from there, giving the familiar crossing pattern over the lungs.

    Each family is a periodic band pattern sheared by a curve that depends on x only, so the whole
    cage costs a handful of array operations (inside the cage's window) instead of drawing every rib.
    """
    size = xs.shape[1]
    lowest = max(lung.outline.center_y + lung.outline.semi_y for lung in anatomy.lungs)
    window = _window(
        anatomy.midline - anatomy.rib_reach,
        anatomy.rib_first_y - 0.5 * anatomy.rib_spacing,
        anatomy.midline + anatomy.rib_reach,
        lowest + 0.05,
        size,
    )
    xs, ys = xs[:, window[1]], ys[window[0], :]
    across = np.minimum(np.abs(xs - np.float32(anatomy.midline)) * np.float32(1.0 / anatomy.rib_reach), 1.0)
    curve = np.sqrt(1.0 - across**2)
    inside_cage = np.clip((1.0 - across) * np.float32(anatomy.rib_reach / 0.02), 0.0, 1.0)
    anterior_extent = np.clip((across - 0.45) * np.float32(10.0), 0.0, 1.0) * inside_cage
    # Below the costophrenic angles the ribs disappear into the abdominal soft tissue.
    above_last = np.clip((np.float32(lowest + 0.02) - ys) * np.float32(1.0 / 0.03), 0.0, 1.0)
    # Each rib is a flat-topped band one rib thick with soft (cortical) edges: a trapezoid in the
    # distance from the nearest whole phase.
    half_band = np.float32(0.5 * min(anatomy.rib_thickness / anatomy.rib_spacing, 0.9))
    edge_gain = np.float32(1.0 / (0.3 * half_band))
    rows_phase = (ys - np.float32(anatomy.rib_first_y)) * np.float32(1.0 / anatomy.rib_spacing)
    cage = np.zeros((ys.shape[0], xs.shape[1]), np.float32)
    posterior = (anatomy.rib_drop * (1.0 - curve), inside_cage)
    anterior = (anatomy.rib_drop * (1.0 + 0.6 * curve), 0.5 * anterior_extent)
    for offset, weight in (posterior, anterior):
        phase = rows_phase - offset * np.float32(1.0 / anatomy.rib_spacing)
        bands = np.rint(phase)
        np.subtract(phase, bands, out=bands)
        np.abs(bands, out=bands)
        np.subtract(half_band, bands, out=bands)
        bands *= edge_gain
        bands += np.float32(0.5)
        np.clip(bands, 0.0, 1.0, out=bands)
        bands *= phase > -0.5
        cage += bands * (weight * above_last)
    return window, cage


def _clavicles(anatomy: _Anatomy, xs: np.ndarray, ys: np.ndarray) -> tuple[_Window, np.ndarray]:
    """Two bony bars from the sternal notch rising laterally towards the shoulders."""
    size = xs.shape[1]
    window = _window(0.0, anatomy.clavicle_y - 0.05, 1.0, anatomy.clavicle_y + 0.06, size)
    lateral = np.abs(xs - np.float32(anatomy.midline))
    along = np.clip((lateral - 0.05) * np.float32(1.0 / 0.26), 0.0, 1.0)
    centre_line = np.float32(anatomy.clavicle_y + 0.03) - np.float32(0.055) * along
    centre_line += np.float32(0.02) * along * (1.0 - along)  # gently S-shaped
    extent = np.clip((lateral - 0.04) * np.float32(100.0), 0.0, 1.0)
    extent *= np.clip((0.33 - lateral) * np.float32(100.0), 0.0, 1.0)
    distance = (ys[window[0], :] - centre_line) * np.float32(1.0 / max(0.011, 0.7 / size))
    return window, np.maximum(1.0 - distance**2, 0.0) * extent


def _draw_vessels(anatomy: _Anatomy, size: int) -> tuple[_Window, np.ndarray]:
    """Hilar shadows and vessel trees, drawn only in the window spanning both lungs (they are shown
    only where lung is aerated)."""
    lung_bounds = [lung.bounds() for lung in anatomy.lungs]
    x0, y0, x1, y1 = zip(*lung_bounds)
    window = _window(min(x0), min(y0), max(x1), max(y1), size)
    origin_x, origin_y = window[1].start, window[0].start
    canvas = np.zeros((window[0].stop - origin_y, window[1].stop - origin_x), np.float32)
    for lung in anatomy.lungs:
        center = _fixed_point(np.array(lung.hilum), size, origin_x, origin_y)
        cv2.circle(canvas, (int(center[0]), int(center[1])), int(round(0.025 * size * 16)), 0.8, -1, cv2.LINE_8, 4)
    segments = anatomy.vessels
    ends = _fixed_point(segments[:, :4].reshape(-1, 2, 2), size, origin_x, origin_y)
    for calibre in np.unique(segments[:, 4]):
        same = segments[:, 4] == calibre
        thickness = max(1, int(round(0.007 * size * float(calibre))))
        cv2.polylines(canvas, list(ends[same]), False, float(calibre), thickness, cv2.LINE_8, 4)
    return window, _blur(canvas, 0.004 * size)


def _smooth_field(coefficients: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Low-frequency cosine field: sum over i, j of c[i, j] cos(i pi y) cos(j pi x)."""
    order = np.arange(coefficients.shape[0], dtype=np.float32)
    basis_x = np.cos(np.float32(math.pi) * order[:, None] * xs)  # (n, size)
    basis_y = np.cos(np.float32(math.pi) * ys * order[None, :])  # (size, n)
    return basis_y @ coefficients @ basis_x


def _render_atelectasis(
    plan: _AtelectasisPlan, lung_mask: np.ndarray, window: _Window, size: int
) -> tuple[np.ndarray, _Box]:
    """Collapsed lung is airless, hence a soft-tissue-dense band or wedge inside the lung field."""
    canvas = np.zeros(lung_mask.shape, np.float32)
    origin_x, origin_y = window[1].start, window[0].start
    if plan.band is not None:
        b = plan.band
        center = _fixed_point(np.array([b.center_x, b.center_y]), size, origin_x, origin_y)
        axes = (max(1, int(round(b.semi_x * size * 16))), max(1, int(round(b.semi_y * size * 16))))
        cv2.ellipse(canvas, (int(center[0]), int(center[1])), axes, b.angle_deg, 0.0, 360.0, 1.0, -1, cv2.LINE_8, 4)
    else:
        cv2.fillConvexPoly(canvas, _fixed_point(np.array(plan.wedge), size, origin_x, origin_y), 1.0, cv2.LINE_8, 4)
    shape = _blur(canvas, 0.006 * size) * lung_mask
    return np.float32(plan.contrast) * shape, _patch_box(shape, window)


def _render_effusion(
    plan: _EffusionPlan, lung: _Lung, lung_mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, window: _Window
) -> tuple[np.ndarray, _Box]:
    """Pleural fluid settles at the base and climbs the lateral chest wall (concave meniscus); it
    replaces aerated lung, so the base turns soft-tissue white and loses its vessel markings."""
    e = lung.outline
    level = e.center_y + e.semi_y - 2.0 * e.semi_y * plan.fluid_height
    toward_lateral = np.clip(-lung.medial_sign * (xs - np.float32(e.center_x)) / np.float32(e.semi_x), -1.0, 1.0)
    surface = np.float32(level) - np.float32(plan.meniscus_rise) * ((toward_lateral + 1.0) * 0.5) ** 2
    depth = np.clip((ys - surface) / np.float32(plan.density_ramp), 0.0, 1.0)
    box = _mask_box(np.minimum(depth, lung_mask), 0.3, window) or _patch_box(depth * lung_mask, window)
    return np.float32(plan.fill) * depth * lung_mask, box


def _render_pneumothorax(
    plan: _PneumothoraxPlan,
    lung: _Lung,
    lung_mask: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    window: _Window,
    size: int,
) -> tuple[np.ndarray, np.ndarray, _Box]:
    """Air between the chest wall and a lung collapsed towards hilum and base: darker, without vessel
    or rib texture, bounded by the thin bright line of the visceral pleura."""
    e = lung.outline
    semi_x, semi_y = e.semi_x * plan.collapse_x, e.semi_y * plan.collapse_y
    collapsed = _Lung(
        outline=_Ellipse(
            center_x=e.center_x + lung.medial_sign * (e.semi_x - semi_x),
            center_y=e.center_y + 0.9 * (e.semi_y - semi_y),
            semi_x=semi_x,
            semi_y=semi_y,
        ),
        medial_sign=lung.medial_sign,
        base_widening=lung.base_widening,
        diaphragm=lung.diaphragm,
    )
    collapsed_mask, _ = _lung_fields(xs, ys, collapsed, max(0.004, 0.7 / size))
    free_air = lung_mask * (1.0 - collapsed_mask)
    near_air = np.clip(_blur(free_air, 0.012 * size) * 4.0, 0.0, 1.0)
    pleura = 4.0 * collapsed_mask * (1.0 - collapsed_mask) * near_air * lung_mask
    return free_air, np.float32(plan.pleural_line) * pleura, _patch_box(free_air, window)


def _render_mass(
    plan: _MassPlan, rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, size: int
) -> tuple[_Window, np.ndarray, _Box]:
    """A large lobulated opacity, denser centrally, with mottled internal texture (necrosis, air)."""
    reach = plan.radius * (1.0 + sum(amplitude for _, amplitude, _ in plan.lobulation))
    window = _window(plan.center_x - reach, plan.center_y - reach, plan.center_x + reach, plan.center_y + reach, size)
    dx = xs[:, window[1]] - np.float32(plan.center_x)
    dy = ys[window[0], :] - np.float32(plan.center_y)
    angle = np.arctan2(dy, dx)
    boundary = np.full(angle.shape, np.float32(plan.radius), np.float32)
    for harmonic, amplitude, phase in plan.lobulation:
        boundary += np.float32(plan.radius * amplitude) * np.cos(harmonic * angle + np.float32(phase))
    relative = np.sqrt(dx**2 + dy**2) / boundary
    inside = np.clip(0.5 + (1.0 - relative) * (boundary / np.float32(max(0.006, 0.7 / size))), 0.0, 1.0)
    dome = 0.7 + 0.3 * np.sqrt(np.clip(1.0 - relative**2, 0.0, 1.0))
    mottle = np.clip(_unit_noise(rng, inside.shape, 0.012 * size), -2.0, 2.0)
    opacity = inside * dome * (1.0 + np.float32(plan.texture) * mottle)
    return window, np.float32(plan.contrast) * opacity, _patch_box(inside, window)


def _render_nodules(plan: _NodulePlan, xs: np.ndarray, ys: np.ndarray, density: np.ndarray) -> _Box:
    """Small round soft-tissue spots, added to `density` in place; the cluster's box is returned."""
    size = density.shape[0]
    for (center_x, center_y), radius, contrast in zip(plan.centers, plan.radii, plan.contrasts):
        rows, cols = _window(center_x - radius, center_y - radius, center_x + radius, center_y + radius, size)
        distance = np.sqrt((xs[:, cols] - np.float32(center_x)) ** 2 + (ys[rows, :] - np.float32(center_y)) ** 2)
        relative = distance * np.float32(1.0 / radius)
        inside = np.clip(0.5 + (1.0 - relative) * np.float32(radius / max(0.25 * radius, 0.7 / size)), 0.0, 1.0)
        dome = 0.6 + 0.4 * np.sqrt(np.clip(1.0 - relative**2, 0.0, 1.0))
        density[rows, cols] += np.float32(contrast) * inside * dome
    centers, radii = np.asarray(plan.centers), np.asarray(plan.radii)
    low, high = (centers - radii[:, None]).min(axis=0), (centers + radii[:, None]).max(axis=0)
    return _fraction_box(low[0], low[1], high[0], high[1], size)


def render_case(seed: int, image_size: int, decorrelated: bool = False) -> SyntheticCase:
    """Render one case at image_size x image_size (any size 32..1024 works; geometry scales with size).

    All randomness comes from `numpy.random.default_rng(seed)`: first the whole scene (labels,
    anatomy, lesion geometry, exposure), which does not depend on the size, then the pixel noise.
    ``decorrelated`` draws the labels with every disease independent (same prevalences); everything
    else about the case is drawn and rendered exactly as usual.
    """
    size = operator.index(image_size)
    if size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE}, got {size}")
    rng = np.random.default_rng(operator.index(seed))

    diseases = _sample_diseases(rng, decorrelated)
    anatomy = _sample_anatomy(rng, cardiomegaly=_CARDIOMEGALY in diseases)
    atelectasis = _sample_atelectasis(rng, anatomy) if _ATELECTASIS in diseases else None
    effusion = _sample_effusion(rng) if _EFFUSION in diseases else None
    mass = _sample_mass(rng, anatomy) if _MASS in diseases else None
    nodules = _sample_nodules(rng, anatomy) if _NODULE in diseases else None
    pneumothorax = _sample_pneumothorax(rng) if _PNEUMOTHORAX in diseases else None
    exposure = _sample_exposure(rng)
    pose = _sample_pose(rng)
    boxes: dict[int, list[_Box]] = {disease: [] for disease in sorted(diseases)}

    xs, ys = _grid(size)
    edge = max(0.008, 0.7 / size)
    body = _soft_ellipse(xs, ys, anatomy.body, 0.03)
    # Mediastinum (dense column between the lungs, above the heart), spine, and the air-filled trachea.
    offset = xs - np.float32(anatomy.midline)
    column = np.exp(-((offset * np.float32(1.0 / 0.06)) ** 4))
    above_heart = np.clip((np.float32(anatomy.heart.center_y) - ys) * np.float32(1.0 / 0.1), 0.0, 1.0)
    spine = np.exp(-((offset * np.float32(1.0 / 0.028)) ** 2))
    trachea = np.exp(-((offset * np.float32(1.0 / 0.016)) ** 4))
    above_carina = np.clip((np.float32(anatomy.carina_y) - ys) * np.float32(1.0 / 0.03), 0.0, 1.0)
    tissue = (np.float32(anatomy.mediastinum_density) * above_heart) * column
    tissue += np.float32(anatomy.soft_tissue) + np.float32(0.05) * spine
    tissue -= (np.float32(anatomy.trachea_depth) * above_carina) * trachea
    density = np.float32(0.06) + body * tissue

    heart = np.zeros((size, size), np.float32)
    heart_window = _window(*anatomy.heart.bounds(), size)
    heart[heart_window] = _soft_ellipse(xs[:, heart_window[1]], ys[heart_window[0], :], anatomy.heart, edge)
    density[heart_window] += np.float32(anatomy.heart_density) * heart[heart_window]

    air = np.zeros((size, size), np.float32)
    aerated_lung = np.zeros((size, size), np.float32)
    for lung_index, lung in enumerate(anatomy.lungs):
        window = _window(*lung.bounds(), size)
        lung_xs, lung_ys = xs[:, window[1]], ys[window[0], :]
        mask, thickness = _lung_fields(lung_xs, lung_ys, lung, edge)
        aerated = mask * (1.0 - heart[window])  # the heart shadow hides the lung behind it
        lung_air = aerated * thickness
        if effusion is not None and effusion.lung_index == lung_index:
            fluid, box = _render_effusion(effusion, lung, mask, lung_xs, lung_ys, window)
            lung_air *= 1.0 - fluid
            aerated *= 1.0 - fluid
            boxes[_EFFUSION].append(box)
        if pneumothorax is not None and pneumothorax.lung_index == lung_index:
            free_air, pleura, box = _render_pneumothorax(pneumothorax, lung, mask, lung_xs, lung_ys, window, size)
            density[window] += pleura - np.float32(pneumothorax.darkness) * free_air
            aerated *= 1.0 - free_air
            boxes[_PNEUMOTHORAX].append(box)
        if atelectasis is not None and atelectasis.lung_index == lung_index:
            opacity, box = _render_atelectasis(atelectasis, mask, window, size)
            density[window] += opacity
            boxes[_ATELECTASIS].append(box)
        air[window] += lung_air
        aerated_lung[window] += aerated

    if _CARDIOMEGALY in diseases:
        boxes[_CARDIOMEGALY].append(_fraction_box(*anatomy.heart.bounds(), size))
    if mass is not None:
        window, opacity, box = _render_mass(mass, rng, xs, ys, size)
        density[window] += opacity
        boxes[_MASS].append(box)
    if nodules is not None:
        boxes[_NODULE].append(_render_nodules(nodules, xs, ys, density))

    density -= np.float32(anatomy.lung_depth) * air
    # Ribs stand out against aerated lung and fade over soft tissue, fluid and the heart.
    cage_window, cage = _rib_cage(anatomy, xs, ys)
    ribs_visible = np.float32(0.35) * body[cage_window] + np.float32(0.65) * aerated_lung[cage_window]
    density[cage_window] += np.float32(anatomy.rib_amplitude) * cage * ribs_visible
    clavicle_window, clavicles = _clavicles(anatomy, xs, ys)
    density[clavicle_window] += np.float32(anatomy.clavicle_amplitude) * clavicles * body[clavicle_window]
    vessel_window, vessels = _draw_vessels(anatomy, size)
    density[vessel_window] += np.float32(anatomy.vessel_amplitude) * vessels * aerated_lung[vessel_window]
    density = _apply_pose(density, pose, size)
    # Uneven exposure belongs to the detector, not to the patient: it stays where it is.
    density += np.float32(exposure.shading_amplitude / 3.0) * _smooth_field(exposure.shading, xs, ys)

    # Detector response: per-image gamma, contrast and brightness, then quantum noise.
    signal = np.power(np.clip(density, 0.0, 1.0), np.float32(exposure.gamma))
    signal *= np.float32(exposure.contrast)
    signal += np.float32(0.5 + exposure.brightness - 0.5 * exposure.contrast)
    signal += np.float32(exposure.noise_sigma) * _unit_noise(rng, (size, size), 0.003 * size)
    signal *= np.float32(255.0)
    image = np.clip(signal + np.float32(0.5), 0.0, 255.0).astype(np.uint8)

    target = np.zeros(len(SYNTHETIC_CLASS_NAMES), np.float32)
    target[sorted(diseases)] = 1.0
    target[_NO_FINDING] = 0.0 if diseases else 1.0
    flat_boxes = tuple(
        (int(disease), float(x), float(y), float(w), float(h))
        for disease, found in boxes.items()
        for x, y, w, h in (_pose_box(box, pose, size) for box in found)
    )
    return SyntheticCase(image=image, target=target, boxes=flat_boxes, pose=(pose.shift_x, pose.shift_y, pose.scale))
