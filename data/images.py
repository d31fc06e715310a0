"""Decoding image files into the arrays ``load_image`` returns: PNG/JPEG/BMP/TIFF and DICOM.

Every reader goes through :func:`read_image`, so a corrupt or missing file is always an
:class:`~data.base.UnreadableImage` that names its path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

from data.base import UnreadableImage

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
DICOM_SUFFIXES = (".dcm", ".dicom")


def read_image(path: Path | str, channels: int) -> np.ndarray:
    """uint8 [H, W] (channels 1) or [H, W, 3] RGB (channels 3); raises UnreadableImage naming the path.

    PNG/JPEG/BMP/TIFF go through OpenCV (8- or 16-bit, grey, RGB or RGBA), DICOM through pydicom.
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        image = read_dicom(path)
    else:
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except FileNotFoundError:
            raise UnreadableImage(path, "file not found") from None
        except OSError as error:
            raise UnreadableImage(path, f"cannot read: {error.strerror or error}") from None
        if data.size == 0:
            raise UnreadableImage(path, "empty file")
        if path.suffix.lower() in (".jpg", ".jpeg") and not _jpeg_complete(data):
            raise UnreadableImage(path, "truncated JPEG (no end-of-image marker)")
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        if image is None:
            raise UnreadableImage(path, "corrupt or truncated, cannot be decoded")
        if image.ndim == 3:  # OpenCV decodes to BGR(A)
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return _as_channels(_to_uint8(image), channels)


def _jpeg_complete(data: np.ndarray) -> bool:
    # OpenCV decodes a cut-off JPEG into a half-grey image with only a warning on stderr. A complete
    # file ends with the EOI marker FF D9 (some writers add a few padding bytes after it).
    tail = data[-16:].tobytes()
    return b"\xff\xd9" in tail


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    # 16-bit PNG/TIFF exports of radiographs rarely use the full range: stretch what is used.
    image = image.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) * (255.0 / (high - low)) if high > low else np.zeros_like(image)
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def _as_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if channels == 1 and image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if channels == 3 and image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return image


def read_dicom(path: Path) -> np.ndarray:
    """A DICOM radiograph as 8-bit: modality LUT, then the file's VOI window (else the full pixel
    range), MONOCHROME1 inverted so that bone is bright as in every other format."""
    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
    except FileNotFoundError:
        raise UnreadableImage(path, "file not found") from None
    except Exception as error:  # pydicom raises many types: invalid file, missing codec, ...
        raise UnreadableImage(path, f"cannot decode DICOM: {error}".splitlines()[0]) from None
    interpretation = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(dataset.get("SamplesPerPixel", 1))
    if samples == 1 and pixels.ndim == 3:  # multi-frame: the first frame
        pixels = pixels[0]
    if samples > 1:
        if pixels.ndim == 4:
            pixels = pixels[0]
        if interpretation.startswith("YBR"):
            pixels = convert_color_space(pixels, interpretation, "RGB")
        return _to_uint8(pixels)
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    window = _first_window(dataset)
    if window is not None:  # the window the modality chose for reading: [centre - width/2, centre + width/2]
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    else:
        if "VOILUTSequence" in dataset:
            values = np.asarray(apply_voi_lut(values, dataset, index=0), dtype=np.float64)
        low, high = float(values.min()), float(values.max())
    image = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    if interpretation == "MONOCHROME1":
        image = 255 - image
    return image


def _first_window(dataset) -> tuple[float, float] | None:
    """(centre, width) of the file's first VOI window, if it has a usable one."""
    if "WindowCenter" not in dataset or "WindowWidth" not in dataset:
        return None
    def first(value) -> float:  # a multi-valued attribute lists alternatives: take the first
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            value = value[0]
        return float(value)

    try:
        centre, width = first(dataset.WindowCenter), first(dataset.WindowWidth)
    except (TypeError, ValueError):
        return None
    return (centre, width) if width > 0 else None


def image_frame(path: Path) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        return int(header.Rows), int(header.Columns)
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as error:
        raise UnreadableImage(path, f"cannot read the image header: {error}") from None
    return height, width
