"""The embedded tasks: real tabular data shipped with scikit-learn, and generated segmentation.

``breast-cancer``
    The Wisconsin Diagnostic Breast Cancer data set (Street, Wolberg and Mangasarian 1993) that
    scikit-learn ships in its package: 569 fine-needle-aspirate samples, 30 real-valued features
    each, 2 classes (0 malignant, 212 samples; 1 benign, 357). Features are standardised with
    the mean and standard deviation of the sites' training splits pooled (never the validation
    or test samples), so no statistic leaks from held-out data. Classification, 2 classes.

``synthetic-seg2d`` / ``synthetic-seg3d``
    Images of random discs (balls in 3D) on a noisy background, generated with MONAI's
    ``create_test_image_2d`` / ``create_test_image_3d`` from a ``numpy.random.RandomState``
    seeded by the run's seed, so the same seed gives the same images. Binary segmentation
    (``num_classes=2``): targets are int64 ``(N, 1, *spatial)`` in {0, 1} (1 inside a disc),
    inputs float32 ``(N, 1, *spatial)`` rescaled to [0, 1] (discs 0.5-1 before rescaling, noise
    below 0.25). Defaults are small enough for a tiny UNet on two CPU cores: 2D 160 images of
    64x64, 3D 48 volumes of 32^3. ``samples`` and ``image_size`` override them; radii scale
    with the image size (at most ``size // 6`` in 2D and ``size // 4`` in 3D, at least half
    that), which makes about a fifth of the pixels (2D) or a tenth of the voxels (3D) foreground.

Nothing is downloaded; scikit-learn and MONAI are imported only when a task is loaded.
"""

from __future__ import annotations

import numpy as np

from .config import DataConfig
from .source import Source
from .types import ArrayDataset, DataKind, TaskKind, TaskSpec

__all__ = [
    "BREAST_CANCER_SAMPLES",
    "SYNTHETIC_DEFAULTS",
    "SYNTHETIC_MAX_BYTES",
    "embedded_samples",
    "synthetic_shape",
    "synthetic_problems",
    "load_breast_cancer",
    "load_synthetic",
]

BREAST_CANCER_SAMPLES = 569
# kind -> (images in total, side length)
SYNTHETIC_DEFAULTS = {DataKind.SYNTHETIC_SEG2D: (160, 64), DataKind.SYNTHETIC_SEG3D: (48, 32)}
# Generated data is held in memory (float32 inputs + int64 targets); refuse sizes beyond this.
SYNTHETIC_MAX_BYTES = 4 * 1024**3
_OBJECTS = {DataKind.SYNTHETIC_SEG2D: 6, DataKind.SYNTHETIC_SEG3D: 5}
# largest radius = side // this; balls get a larger share so that ~10-20% of voxels are foreground
_RADIUS_DIVISOR = {DataKind.SYNTHETIC_SEG2D: 6, DataKind.SYNTHETIC_SEG3D: 4}
_NOISE = 0.25


def synthetic_shape(config: DataConfig) -> tuple[int, int]:
    """(images in total, side length) a synthetic ``config`` generates."""
    samples, size = SYNTHETIC_DEFAULTS[config.kind]
    return (config.samples or samples, config.image_size or size)


def embedded_samples(config: DataConfig) -> int:
    """How many samples an embedded ``config`` provides in total (test set included)."""
    if config.kind is DataKind.BREAST_CANCER:
        return BREAST_CANCER_SAMPLES
    return synthetic_shape(config)[0]


def synthetic_problems(config: DataConfig) -> list[str]:
    """Sizes a synthetic ``config`` cannot hold in memory."""
    samples, size = synthetic_shape(config)
    dims = 2 if config.kind is DataKind.SYNTHETIC_SEG2D else 3
    needed = samples * size**dims * (4 + 8)
    if needed > SYNTHETIC_MAX_BYTES:
        return [f"data: {samples} {config.kind.value} images of side {size} need "
                f"{needed / 1024**3:.1f} GiB in memory, over the {SYNTHETIC_MAX_BYTES // 1024**3} GiB "
                "limit: lower data.samples or data.image_size"]
    return []


def load_breast_cancer() -> Source:
    """The Wisconsin breast cancer data, unstandardised (the split decides the statistics)."""
    from sklearn.datasets import load_breast_cancer as sklearn_breast_cancer

    bunch = sklearn_breast_cancer()
    data = ArrayDataset(inputs=bunch.data, targets=bunch.target)
    spec = TaskSpec(kind=TaskKind.CLASSIFICATION, input_shape=(data.inputs.shape[1],),
                    spatial_dims=0, num_classes=2)
    return Source(name=DataKind.BREAST_CANCER.value, spec=spec, data=data, standardise=True,
                  description="breast-cancer: Wisconsin diagnostic breast cancer, 569 samples x "
                              "30 features, malignant vs benign (scikit-learn's bundled copy)")


def load_synthetic(config: DataConfig, *, seed: int) -> Source:
    """Generate the synthetic segmentation images of ``config`` deterministically from ``seed``."""
    from monai.data.synthetic import create_test_image_2d, create_test_image_3d

    samples, size = synthetic_shape(config)
    three_d = config.kind is DataKind.SYNTHETIC_SEG3D
    dims = 3 if three_d else 2
    rad_max = max(2, size // _RADIUS_DIVISOR[config.kind])
    rad_min = max(1, rad_max // 2)
    # its own stream, so the images do not depend on how many draws the splitting makes
    state = np.random.RandomState(np.random.SeedSequence([seed, 0x5E6]).generate_state(1)[0])
    images = np.empty((samples, 1) + (size,) * dims, dtype=np.float32)
    masks = np.empty((samples, 1) + (size,) * dims, dtype=np.int64)
    for i in range(samples):
        if three_d:
            image, mask = create_test_image_3d(size, size, size, num_objs=_OBJECTS[config.kind],
                                               rad_max=rad_max, rad_min=rad_min, noise_max=_NOISE,
                                               num_seg_classes=1, random_state=state)
        else:
            image, mask = create_test_image_2d(size, size, num_objs=_OBJECTS[config.kind],
                                               rad_max=rad_max, rad_min=rad_min, noise_max=_NOISE,
                                               num_seg_classes=1, random_state=state)
        images[i, 0] = image
        masks[i, 0] = mask > 0
    spec = TaskSpec(kind=TaskKind.SEGMENTATION, input_shape=images.shape[1:], spatial_dims=dims,
                    num_classes=2)
    shape = "x".join([str(size)] * dims)
    what = "volumes" if three_d else "images"
    return Source(name=config.kind.value, spec=spec, data=ArrayDataset(inputs=images, targets=masks),
                  description=f"{config.kind.value}: {samples} synthetic {shape} {what} of random "
                              f"{'balls' if three_d else 'discs'}, binary segmentation (MONAI generator)")
