"""Reading one image file into a channel-first float32 array in [0, 1] (the image-folder readers).

- PNG, JPEG, BMP, TIFF via Pillow: grey modes give ``(1, H, W)``, everything else is converted
  to RGB ``(3, H, W)``. 8-bit pixels are divided by 255, 16-bit by 65535, other modes (32-bit
  integer, float) are min-max scaled per image.
- NIfTI (``.nii``, ``.nii.gz``) via nibabel: a 2D image (or one with a single slice) gives
  ``(1, H, W)``, a volume ``(1, D, H, W)`` in the array order the file stores (no reorientation).
  Min-max scaled per image, since intensities are scanner- or modality-specific.
- DICOM (``.dcm``) via pydicom: one frame gives ``(1, H, W)`` (``(3, H, W)`` for colour), a
  multi-frame file a volume ``(1, F, H, W)``. Min-max scaled per image; MONOCHROME1 images
  (where high values are dark) are inverted so that bright always means high.

The libraries are used directly rather than through MONAI's ``LoadImage``, which would load
torch just to read pixels; each is imported only when a file of its format is read.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from ..errors import MissingDependencyError

__all__ = ["SUFFIXES", "image_format", "read_image"]

_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DICOM_SUFFIXES = (".dcm", ".dicom")
SUFFIXES = _PIL_SUFFIXES + _NIFTI_SUFFIXES + _DICOM_SUFFIXES
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def image_format(path: Path) -> str | None:
    """``"pil"``, ``"nifti"`` or ``"dicom"`` from the file name, or None if unsupported."""
    name = path.name.lower()
    for fmt, suffixes in (("nifti", _NIFTI_SUFFIXES), ("dicom", _DICOM_SUFFIXES), ("pil", _PIL_SUFFIXES)):
        if name.endswith(suffixes):
            return fmt
    return None


def _min_max(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros_like(array)
    return (array - np.float32(low)) / np.float32(high - low)


def _scale(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255)
    if array.dtype == np.uint16:
        return array.astype(np.float32) / np.float32(65535)
    return _min_max(array)


def _import(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"reading this image needs the {package!r} package: "
                                     f"pip install {package}") from exc


def _read_pil(path: Path) -> np.ndarray:
    pil_image = _import("PIL.Image", "pillow")
    with pil_image.open(path) as image:
        if image.mode in _GREY_MODES:
            if image.mode == "LA":
                image = image.convert("L")
            return _scale(np.array(image))[None]
        return _scale(np.array(image.convert("RGB"))).transpose(2, 0, 1)


def _read_nifti(path: Path) -> np.ndarray:
    nibabel = _import("nibabel", "nibabel")
    data = np.asarray(nibabel.load(str(path)).get_fdata(dtype=np.float32))
    while data.ndim > 2 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise ValueError(f"NIfTI data of shape {data.shape} is not a 2D image or a 3D volume "
                         "(multi-channel and time series are not supported)")
    return _min_max(data)[None]


def _read_dicom(path: Path) -> np.ndarray:
    pydicom = _import("pydicom", "pydicom")
    dataset = pydicom.dcmread(str(path))
    pixels = np.asarray(dataset.pixel_array)
    colour = int(getattr(dataset, "SamplesPerPixel", 1)) > 1
    scaled = _min_max(pixels)
    if str(getattr(dataset, "PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 1 - scaled
    if colour:
        if scaled.ndim != 3:
            raise ValueError(f"multi-frame colour DICOM ({pixels.shape}) is not supported")
        return scaled.transpose(2, 0, 1)
    return scaled[None]


def read_image(path: Path) -> np.ndarray:
    """Read ``path`` as float32 ``(C, H, W)`` or ``(1, D, H, W)`` in [0, 1].

    ValueError for an unsupported suffix or content; the readers' own errors propagate.
    """
    fmt = image_format(path)
    if fmt == "pil":
        return _read_pil(path)
    if fmt == "nifti":
        return _read_nifti(path)
    if fmt == "dicom":
        return _read_dicom(path)
    raise ValueError(f"unsupported image file {path.name!r}; supported suffixes are {list(SUFFIXES)}")
