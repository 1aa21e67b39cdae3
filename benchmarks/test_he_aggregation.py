"""Encrypted aggregation of a DenseNet121 update: securefed's packed, seeded CKKS against the
per-layer CKKS of NVIDIA FLARE's homomorphic-encryption aggregation.

Baseline ("FLARE-style", written here with TenSEAL after FLARE's documented settings): every
parameter tensor is one ``ts.ckks_vector`` under a public-key context (ring 8192, primes
[60, 40, 40], scale 2^40), serialized. The coordinator deserializes each site's vectors as they
arrive and adds them into a running total (FLARE's in-time accumulation, so no more than one
site's upload is held), then serializes the total; a site deserializes and decrypts it. FLARE
also multiplies each contribution by a plaintext weight, left out here: the baseline only gets
faster. TenSEAL keeps its default thread pool, as in FLARE.

Ours: :class:`securefed.he.tenseal_ckks.CKKSCodec` under the default :class:`HEConfig` (ring 4096,
primes 60 + 49, scale 2^50): the whole update clipped and packed 2048 values per ciphertext,
encrypted with the secret key and sent seeded, the weight in one extra slot; the coordinator adds
every upload position by position.

Workload: the update of MONAI's DenseNet121 (2D, 1 input channel, 2 classes, as
:func:`securefed.models.build_model` makes it: 6.95M parameters in 364 tensors), one SGD step
(lr 0.01) on a random batch of 8 64x64 images, a different batch for each of 10 sites.

Every site's update is encrypted once for the sum and its error; encryption time is the fastest
of those 10 encryptions for the baseline and of a few repeats of site 0's for ours. Rows: bytes
per site (target <= 0.5x), encryption time per site (target <= 0.5x), the coordinator's sum of 10
sites and a site's decryption of it (informational), and the largest error of the decrypted sum
relative to max |sum| (ours must stay below 1e-6; asserted, as are the two targets).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import tenseal as ts
import torch

from securefed.he.config import HEConfig
from securefed.he.tenseal_ckks import CKKSCodec, new_context

torch.set_num_threads(1)

SITES = 10
LEARNING_RATE = 0.01
BATCH = 8
ENCRYPT_ROUNDS = 3
DECRYPT_ROUNDS = 3
BYTES_TARGET = 0.5
ENCRYPT_TARGET = 0.5
ERROR_TARGET = 1e-6  # of max |sum|: far below what an update's last float32 bit carries
FLOAT32_BYTES = 4


# -- the workload -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    updates: list[np.ndarray]  # one flat float32 vector per site
    shapes: list[tuple[int, ...]]  # the parameter tensors, in order
    expected: np.ndarray  # float64 sum of the updates

    @property
    def parameters(self) -> int:
        return self.updates[0].size

    def layers(self, site: int) -> list[np.ndarray]:
        """Site ``site``'s update as one array per parameter tensor (views, no copies)."""
        sizes = np.cumsum([int(np.prod(s)) for s in self.shapes])[:-1]
        return [part.reshape(shape) for part, shape in zip(np.split(self.updates[site], sizes), self.shapes)]


@pytest.fixture(scope="module")
def workload() -> Workload:
    from securefed.data import TaskKind, TaskSpec
    from securefed.models import ModelConfig, build_model

    spec = TaskSpec(kind=TaskKind.CLASSIFICATION, input_shape=(1, 64, 64), spatial_dims=2, num_classes=2)
    network = build_model(ModelConfig(name="densenet121"), spec, seed=0)
    parameters = [p for p in network.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    updates = []
    for _ in range(SITES):
        images = torch.randn(BATCH, *spec.input_shape, generator=generator)
        labels = torch.randint(0, spec.num_classes, (BATCH,), generator=generator)
        network.zero_grad()
        torch.nn.functional.cross_entropy(network(images), labels).backward()
        step = torch.cat([p.grad.reshape(-1) for p in parameters]) * -LEARNING_RATE
        updates.append(step.numpy().astype(np.float32))
    expected = np.sum([u.astype(np.float64) for u in updates], axis=0)
    assert np.abs(expected).max() < HEConfig().clip, "the update must lie inside the clip to compare sums"
    return Workload(updates=updates, shapes=[tuple(p.shape) for p in parameters], expected=expected)


def _relative_error(total: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(total - expected).max() / np.abs(expected).max())


# -- the baseline -------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """TenSEAL prints a warning on stdout for every vector longer than one ciphertext; hide it."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class FlareStyle:
    """One ``ckks_vector`` per parameter tensor, public-key CKKS, FLARE's default parameters."""

    def __init__(self) -> None:
        self.site_context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40])
        self.site_context.global_scale = 2**40
        self.coordinator_context = ts.context_from(self.site_context.serialize(save_secret_key=False))

    def encrypt(self, layers: list[np.ndarray]) -> list[bytes]:
        with _quiet_stdout():
            return [ts.ckks_vector(self.site_context, layer.reshape(-1).tolist()).serialize() for layer in layers]

    def accumulate(self, total: list | None, upload: list[bytes]) -> list:
        """Add one site's upload into the running total, one tensor loaded at a time."""
        with _quiet_stdout():
            if total is None:
                return [ts.ckks_vector_from(self.coordinator_context, data) for data in upload]
            for running, data in zip(total, upload):
                running += ts.ckks_vector_from(self.coordinator_context, data)
        return total

    def decrypt(self, total: list[bytes]) -> np.ndarray:
        with _quiet_stdout():
            return np.concatenate([np.asarray(ts.ckks_vector_from(self.site_context, data).decrypt())
                                   for data in total])


@dataclass(frozen=True)
class BaselineRun:
    bytes_per_site: int
    encrypt_s: list[float]  # one per site
    aggregate_s: float  # deserialize and add every site's upload, serialize the total
    decrypt_s: float
    relative_error: float


@pytest.fixture(scope="module")
def baseline(workload: Workload) -> BaselineRun:
    flare = FlareStyle()
    encrypt_s, sizes, aggregate_s, total = [], [], 0.0, None
    for site in range(SITES):
        layers = workload.layers(site)
        start = time.perf_counter()
        upload = flare.encrypt(layers)
        encrypt_s.append(time.perf_counter() - start)
        sizes.append(sum(map(len, upload)))
        start = time.perf_counter()
        total = flare.accumulate(total, upload)
        aggregate_s += time.perf_counter() - start
        del upload  # about 400 MB a site: one at a time
    start = time.perf_counter()
    serialized = [vector.serialize() for vector in total]
    aggregate_s += time.perf_counter() - start
    del total
    start = time.perf_counter()
    values = flare.decrypt(serialized)
    decrypt_s = time.perf_counter() - start
    return BaselineRun(bytes_per_site=max(sizes), encrypt_s=encrypt_s, aggregate_s=aggregate_s, decrypt_s=decrypt_s,
                       relative_error=_relative_error(values, workload.expected))


# -- ours ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OursRun:
    site: CKKSCodec
    coordinator: CKKSCodec
    uploads: list[list[bytes]]
    total: list[bytes]


@pytest.fixture(scope="module")
def ours(workload: Workload) -> Iterator[OursRun]:
    config = HEConfig()
    secret, public = new_context(config)
    with CKKSCodec(config, secret) as site, CKKSCodec(config, public) as coordinator:
        uploads = [site.encrypt(update, append_weight=True) for update in workload.updates]
        yield OursRun(site=site, coordinator=coordinator, uploads=uploads, total=coordinator.add(uploads))


def _label(workload: Workload) -> str:
    return f"HE DenseNet121 ({workload.parameters / 1e6:.2f}M params, {SITES} sites)"


# -- the benchmarks -----------------------------------------------------------------------------
def test_upload_bytes_per_site(benchmark, run_pedantic, report, workload, baseline, ours):
    benchmark.group = "HE aggregation: bytes per site"
    upload, _ = run_pedantic(ours.site.encrypt, args=(workload.updates[0],), kwargs={"append_weight": True})
    size = sum(map(len, upload))
    ratio = size / baseline.bytes_per_site
    per_parameter, baseline_per_parameter = size / workload.parameters, baseline.bytes_per_site / workload.parameters
    report(name=f"{_label(workload)}: upload bytes, securefed / FLARE-style", ours=float(size),
           baseline=float(baseline.bytes_per_site), unit="B", ratio=ratio, ratio_means="ours / baseline",
           target=("<=", BYTES_TARGET), parameters=workload.parameters, ciphertexts=len(upload),
           bytes_per_parameter=per_parameter, baseline_bytes_per_parameter=baseline_per_parameter,
           float32_bytes_per_parameter=FLOAT32_BYTES,
           notes=[f"bytes per parameter: securefed {per_parameter:.2f}, FLARE-style {baseline_per_parameter:.2f}, "
                  f"float32 {FLOAT32_BYTES} ({per_parameter / FLOAT32_BYTES:.1f}x and "
                  f"{baseline_per_parameter / FLOAT32_BYTES:.1f}x float32); time recorded: one encryption"])
    assert ratio <= BYTES_TARGET


def test_encryption_time_per_site(benchmark, run_pedantic, report, workload, baseline, ours):
    benchmark.group = "HE aggregation: encryption per site"
    _, seconds = run_pedantic(ours.site.encrypt, args=(workload.updates[0],), kwargs={"append_weight": True},
                              rounds=ENCRYPT_ROUNDS)
    reference = min(baseline.encrypt_s)
    ratio = seconds / reference
    report(name=f"{_label(workload)}: encryption per site, securefed / FLARE-style", ours=seconds,
           baseline=reference, ratio=ratio, ratio_means="ours / baseline", target=("<=", ENCRYPT_TARGET),
           us_per_parameter=seconds / workload.parameters * 1e6,
           baseline_us_per_parameter=reference / workload.parameters * 1e6, baseline_encrypt_s=baseline.encrypt_s,
           notes=[f"per parameter: securefed {seconds / workload.parameters * 1e6:.3f} us, FLARE-style "
                  f"{reference / workload.parameters * 1e6:.3f} us (fastest of {ENCRYPT_ROUNDS} repeats / "
                  f"{SITES} sites)"])
    assert ratio <= ENCRYPT_TARGET


def test_coordinator_aggregation(benchmark, run_pedantic, report, workload, baseline, ours):
    benchmark.group = "HE aggregation: coordinator sum"
    _, seconds = run_pedantic(ours.coordinator.add, args=(ours.uploads,))
    report(name=f"{_label(workload)}: coordinator sum, securefed / FLARE-style", ours=seconds,
           baseline=baseline.aggregate_s, ratio=seconds / baseline.aggregate_s, ratio_means="ours / baseline",
           target=None, total_bytes=sum(map(len, ours.total)),
           notes=["load and add every site's upload, serialize the total (FLARE-style: as each arrives)"])


def test_decryption_of_the_sum(benchmark, run_pedantic, report, workload, baseline, ours):
    benchmark.group = "HE aggregation: decryption"
    length = workload.parameters + 1
    _, seconds = run_pedantic(ours.site.decrypt, args=(ours.total,), kwargs={"length": length},
                              rounds=DECRYPT_ROUNDS)
    report(name=f"{_label(workload)}: decryption of the sum, securefed / FLARE-style", ours=seconds,
           baseline=baseline.decrypt_s, ratio=seconds / baseline.decrypt_s, ratio_means="ours / baseline",
           target=None)


def test_error_of_the_sum(benchmark, run_pedantic, report, workload, baseline, ours):
    benchmark.group = "HE aggregation: error"
    values, _ = run_pedantic(ours.site.decrypt, args=(ours.total,), kwargs={"length": workload.parameters + 1})
    error = _relative_error(values[:-1], workload.expected)
    assert abs(values[-1] - SITES) < 1e-6  # the weights' sum
    report(name=f"{_label(workload)}: max error / max |sum|, securefed / FLARE-style", ours=error,
           baseline=baseline.relative_error, unit="rel", ratio=error / baseline.relative_error,
           ratio_means="ours / baseline", target=None, max_abs_sum=float(np.abs(workload.expected).max()),
           exact_ratio=error / baseline.relative_error,
           notes=[f"ours / baseline = {error / baseline.relative_error:.2e}; securefed must stay below "
                  f"{ERROR_TARGET:g} of max |sum| (asserted); time recorded: one decryption"])
    assert error < ERROR_TARGET
