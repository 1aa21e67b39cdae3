"""DP-SGD on CUDA: a MONAI network trains on the GPU, clipping modes agree there, the release guards
do not refuse correct TF32 steps, DPDDP on >1 GPU.

Skipped where CUDA is absent. The privacy numbers are checked against dp-accounting; the
clipping modes against each other with TF32 off (TF32 convolutions differ at ~1e-3).
"""

from __future__ import annotations

import copy
import importlib.util
import pathlib

import dp_accounting
import pytest
import torch
from torch.utils.data import TensorDataset

from securefed.privacy.dpsgd import make_private
from securefed.privacy.dpsgd_config import ClippingMode, DPSGDConfig
from securefed.privacy.losses import per_sample_cross_entropy
from securefed.privacy.model_compat import make_dp_compatible

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
torch.set_num_threads(1)


def _unet() -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    fixed, report = make_dp_compatible(net)
    assert report.ok, report.summary()
    return fixed


def _images(n: int = 48) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 32, 32, generator=g)
    return TensorDataset(x, (x > 0.3).long())


@pytest.fixture
def exact_cuda_math():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_monai_unet_trains_rounds_on_cuda_and_composes_epsilon() -> None:
    model = _unet()
    config = DPSGDConfig(max_grad_norm=1.0, delta=1e-3, batch_size=8, noise_multiplier=1.0, steps_per_round=3,
                         max_physical_batch_size=4, device="auto")
    training = make_private(model, lambda ps: torch.optim.SGD(ps, lr=0.05), _images(), config=config, seed=1)
    assert training.device.type == "cuda"
    before = [p.detach().clone() for p in model.parameters()]
    reports = [training.train_round(per_sample_cross_entropy, round_id=r) for r in range(2)]
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(8 / 48, dp_accounting.GaussianDpEvent(1.0))
    accountant.compose(event, 6)
    assert reports[1].epsilon == pytest.approx(accountant.get_epsilon(1e-3), rel=0.01)
    assert reports[1].epsilon > reports[0].epsilon


def test_clipping_modes_give_the_same_update_on_cuda(exact_cuda_math) -> None:
    base = _unet()
    updates = {}
    for mode in ("per-sample", "ghost", "fast"):
        model = copy.deepcopy(base)
        # A tiny noise multiplier leaves the clipped sum visible in the update; same seed, same batch.
        config = DPSGDConfig(max_grad_norm=0.05, delta=1e-3, batch_size=8, noise_multiplier=1e-6,
                             steps_per_round=1, clipping=mode, device="cuda")
        training = make_private(model, lambda ps: torch.optim.SGD(ps, lr=1.0), _images(), config=config, seed=2)
        assert training.clipping is ClippingMode(mode)
        training.train_round(per_sample_cross_entropy, round_id=0)
        updates[mode] = torch.cat([(a.cuda() - b.detach()).flatten()
                                   for a, b in zip(base.parameters(), model.parameters())])
    reference = updates["per-sample"]
    assert reference.norm() > 0
    for mode in ("ghost", "fast"):
        torch.testing.assert_close(updates[mode], reference, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["ghost", "fast"])
def test_release_guards_pass_correct_steps_under_tf32(mode: str) -> None:
    """Batches of one record make the triangle bound tight (||c g|| = c ||g||); TF32 convolutions
    (cuDNN's default) round the sum and the norms differently. A correct step must still pass."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        config = DPSGDConfig(max_grad_norm=0.05, delta=1e-3, batch_size=1, noise_multiplier=1.0,
                             steps_per_round=24, clipping=mode, device="cuda")
        training = make_private(_unet(), lambda ps: torch.optim.SGD(ps, lr=0.1), _images(), config=config, seed=3)
        assert training.train_round(per_sample_cross_entropy, round_id=0).steps == 24
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def test_noise_on_cuda_has_the_recorded_standard_deviation() -> None:
    model = torch.nn.Linear(100, 50)
    x = torch.randn(40, 100)
    config = DPSGDConfig(max_grad_norm=0.5, delta=1e-3, batch_size=10, noise_multiplier=1.3, steps_per_round=1)
    training = make_private(model, lambda ps: torch.optim.SGD(ps, lr=1.0), TensorDataset(x, x[:, 0]),
                            config=config)
    assert training.device.type == "cuda"
    before = [p.detach().clone() for p in model.parameters()]
    training.train_round(lambda out, y: (out * 0.0).sum(dim=1), round_id=0)  # zero gradient: noise only
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert update.std().item() == pytest.approx(1.3 * 0.5 / 10, rel=0.06)


def test_auto_device_under_torchrun_needs_a_gpu_per_process(monkeypatch) -> None:
    from securefed.errors import ConfigError
    from securefed.privacy.dpsgd_data import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("auto", distributed=True) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(ConfigError, match="one process per GPU"):
        resolve_device("auto", distributed=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 GPUs")
def test_dpddp_across_the_gpus_of_one_site(tmp_path) -> None:
    sibling = pathlib.Path(__file__).with_name("test_privacy_dpsgd.py")
    spec = importlib.util.spec_from_file_location("securefed_dpsgd_cpu_tests", sibling)
    cpu_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_tests)
    gpus = torch.cuda.device_count()
    lines = cpu_tests.run_ddp_worker(tmp_path, gpus)
    assert len(lines) == gpus
    for line in lines:
        assert "device=cuda" in line and "steps=4" in line and "same=True" in line
