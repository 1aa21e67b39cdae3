"""make_private / PrivateTraining: calibration, composition across rounds, charging, clipping.

Privacy numbers are checked against dp-accounting's RdpAccountant (an independent
implementation); clipping against per-sample gradients computed here with plain autograd; the
noise against its empirical standard deviation; step counts against a counting optimizer.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap

import dp_accounting
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from securefed.errors import ConfigError, PrivacyBudgetExceeded, PrivacyError
from securefed.primitives.identity import SiteIdentity
from securefed.privacy.dpsgd import make_private
from securefed.privacy.dpsgd_config import ClippingMode, DPSGDConfig
from securefed.privacy.ledger import PrivacyBudget, PrivacyLedger

torch.set_num_threads(1)
CE = nn.CrossEntropyLoss(reduction="none")


class RecordingDataset(Dataset):
    """A tensor dataset that records which records were read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.reads = x, y, []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        self.reads.append(int(index))
        return self.x[index], self.y[index]


class CountingSGD(torch.optim.SGD):
    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def _data(n: int = 60, features: int = 4, seed: int = 0, scale: float = 1.0) -> RecordingDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g) * scale
    return RecordingDataset(x, (x[:, 0] > 0).long())


def _mlp(seed: int = 0, features: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 6), nn.Tanh(), nn.Linear(6, 2))


def _config(**overrides) -> DPSGDConfig:
    fields = dict(max_grad_norm=1.0, delta=1e-3, batch_size=10, noise_multiplier=1.1, steps_per_round=3,
                  device="cpu")  # test_privacy_gpu covers CUDA
    fields.update(overrides)
    return DPSGDConfig(**fields)


def _reference_epsilon(events, delta: float) -> float:
    """dp-accounting's RDP epsilon of a list of (noise_multiplier, sample_rate, steps)."""
    accountant = dp_accounting.rdp.RdpAccountant()
    for z, q, steps in events:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return accountant.get_epsilon(delta)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_calibrated_noise_spends_the_target_over_the_planned_rounds() -> None:
    data = _data(n=100)
    opt_box = []

    def factory(params):
        opt_box.append(CountingSGD(params, lr=0.1))
        return opt_box[0]

    config = _config(noise_multiplier=None, target_epsilon=2.0, planned_rounds=3, steps_per_round=4)
    training = make_private(_mlp(), factory, data, config=config, seed=1)
    for r in range(3):
        training.train_round(CE, round_id=r)
    # The steps, rate and noise the reference composes are the ones that really ran.
    assert opt_box[0].steps == 12
    assert training.sample_rate == pytest.approx(10 / 100)
    reference = _reference_epsilon([(training.noise_multiplier, 0.1, 12)], 1e-3)
    assert training.epsilon() <= 2.0
    assert 0.99 * 2.0 <= reference <= 2.0 * 1.005
    assert training.epsilon() == pytest.approx(reference, rel=0.01)
    # A fourth round would break the promise made by the calibration: refused, no data read.
    data.reads.clear()
    with pytest.raises(PrivacyBudgetExceeded, match="target_epsilon"):
        training.train_round(CE, round_id=3)
    assert data.reads == [] and opt_box[0].steps == 12


def test_epsilon_composes_every_round_and_survives_a_restart() -> None:
    data = _data()
    config = _config(steps_per_round=5)
    training = make_private(_mlp(), lambda ps: torch.optim.SGD(ps, lr=0.1), data, config=config, seed=2)
    first = training.train_round(CE, round_id="r1").epsilon
    second = training.train_round(CE, round_id="r2").epsilon
    q = 10 / 60
    assert first == pytest.approx(_reference_epsilon([(1.1, q, 5)], 1e-3), rel=0.01)
    assert second == pytest.approx(_reference_epsilon([(1.1, q, 10)], 1e-3), rel=0.01)
    assert second > first * 1.1  # not the epsilon of round 2 alone, which equals `first`
    assert training.epsilon(delta=1e-5) == pytest.approx(_reference_epsilon([(1.1, q, 10)], 1e-5), rel=0.01)

    state = training.state_dict()
    restarted = make_private(_mlp(), lambda ps: torch.optim.SGD(ps, lr=0.1), data, config=config, seed=2)
    restarted.load_state_dict(state)
    third = restarted.train_round(CE, round_id="r3").epsilon
    assert third == pytest.approx(_reference_epsilon([(1.1, q, 15)], 1e-3), rel=0.01)
    with pytest.raises(ConfigError, match="already charged"):
        restarted.train_round(CE, round_id="r2")
    other = make_private(_mlp(), lambda ps: torch.optim.SGD(ps, lr=0.1), _data(n=80), config=config)
    with pytest.raises(ConfigError, match="different plan"):
        other.load_state_dict(state)


def test_ledger_refuses_a_round_before_any_record_is_read(tmp_path) -> None:
    q, delta = 10 / 60, 1e-3
    one, two = (_reference_epsilon([(1.1, q, k)], delta) for k in (3, 6))
    assert two > 1.1 * one
    identity = SiteIdentity.generate("site-a")
    ledger = PrivacyLedger.create(tmp_path / "ledger.db", identity=identity,
                                  budget=PrivacyBudget(epsilon=(one + two) / 2, delta=delta))
    data = _data()
    model = _mlp()
    training = make_private(model, lambda ps: torch.optim.SGD(ps, lr=0.1), data, config=_config(), ledger=ledger)
    report = training.train_round(CE, round_id=1)
    assert report.ledger_entry is not None and report.ledger_entry.round_id == "1"
    assert training.epsilon() == pytest.approx(one, rel=0.01)
    entries = len(ledger.entries())
    before, data.reads[:] = _params(model), []
    with pytest.raises(PrivacyBudgetExceeded):
        training.train_round(CE, round_id=2)
    assert data.reads == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(ledger.entries()) == entries and training.rounds == ("1",)
    # After a restart the ledger still holds round 1: the composition goes on from it.
    restarted = make_private(_mlp(), lambda ps: torch.optim.SGD(ps, lr=0.1), data, config=_config(), ledger=ledger)
    assert restarted.epsilon() == pytest.approx(one, rel=0.01)
    with pytest.raises(PrivacyBudgetExceeded):
        restarted.train_round(CE, round_id=2)


def _manual_clipped_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float,
                           expected_batch: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    total = [torch.zeros_like(p) for p in model.parameters()]
    norms = []
    for i in range(len(x)):
        model.zero_grad()
        CE(model(x[i:i + 1]), y[i:i + 1]).sum().backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(norm)
        for t, g in zip(total, grads):
            t += g * min(1.0, clip / float(norm))
    return [t / expected_batch for t in total], torch.stack(norms)


@pytest.mark.parametrize("mode", ["per-sample", "ghost", "fast"])
@pytest.mark.parametrize("physical", [None, 3])
def test_update_is_the_clipped_per_sample_sum(mode: str, physical: int | None) -> None:
    data = _data(n=40, scale=3.0)
    model = _mlp(seed=3)
    reference = copy.deepcopy(model)
    config = _config(max_grad_norm=0.1, noise_multiplier=1e-6, steps_per_round=1, batch_size=8,
                     max_physical_batch_size=physical, clipping=mode, delta=1e-3)
    training = make_private(model, lambda ps: torch.optim.SGD(ps, lr=1.0), data, config=config, seed=4)
    assert training.clipping is ClippingMode(mode)
    before = _params(model)
    training.train_round(CE, round_id=0)
    batch = sorted(data.reads)
    assert batch, "the seeded Poisson sample happened to be empty; pick another seed"
    expected, norms = _manual_clipped_update(reference, data.x[batch], data.y[batch], 0.1, 8)
    assert (norms > 0.1).any()  # clipping really bites on this data
    for b, p, e in zip(before, model.parameters(), expected):
        torch.testing.assert_close(b - p.detach(), e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["per-sample", "fast"])
def test_physical_batches_keep_the_logical_steps_and_the_result(mode: str) -> None:
    results = []
    for physical in (None, 2):
        data = _data(n=50)
        box = []
        model = _mlp(seed=5)
        config = _config(batch_size=10, steps_per_round=6, max_physical_batch_size=physical, clipping=mode)
        training = make_private(model, lambda ps: box.append(CountingSGD(ps, lr=0.5)) or box[0], data,
                                config=config, seed=6)
        report = training.train_round(CE, round_id=0)
        assert box[0].steps == report.steps == 6
        results.append((report.physical_batches, _params(model)))
    (whole, unsplit), (split, after_split) = results
    assert whole == 6 and split > 6
    for a, b in zip(unsplit, after_split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_noise_has_the_recorded_standard_deviation() -> None:
    model = nn.Linear(60, 40)
    data = _data(n=50, features=60)
    config = _config(max_grad_norm=0.5, noise_multiplier=1.3, batch_size=10, steps_per_round=1)
    training = make_private(model, lambda ps: torch.optim.SGD(ps, lr=1.0), data, config=config)
    before = _params(model)
    # A loss with zero gradient: the whole update is the noise, N(0, (z C)^2) / B per coordinate.
    training.train_round(lambda out, y: (out * 0.0).sum(dim=1), round_id=0)
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert update.std().item() == pytest.approx(1.3 * 0.5 / 10, rel=0.08)
    assert abs(update.mean().item()) < 4 * 1.3 * 0.5 / 10 / math.sqrt(update.numel())


@pytest.mark.parametrize("mode", ["per-sample", "ghost", "fast"])
def test_empty_poisson_batches_still_take_noisy_steps(mode: str) -> None:
    filled = []

    def collate(records):  # only called for non-empty batches
        filled.append(len(records))
        return default_collate(records)

    box = []
    model = _mlp()
    config = _config(batch_size=1, steps_per_round=12, clipping=mode)
    training = make_private(model, lambda ps: box.append(CountingSGD(ps, lr=0.1)) or box[0],
                            DataLoader(_data(n=20), collate_fn=collate), config=config, seed=7)
    before = _params(model)
    report = training.train_round(CE, round_id=0)
    assert box[0].steps == report.steps == 12
    assert 0 < len(filled) < 12  # some batches were empty (q = 0.05, 20 records)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_unseeded_randomness_does_not_replay_torch_default_generator() -> None:
    updates = []
    for _ in range(2):
        torch.manual_seed(0)  # torch's default generator is the same in every fresh process
        data = _data()
        model = _mlp()
        training = make_private(model, lambda ps: torch.optim.SGD(ps, lr=0.1), data, config=_config())
        training.train_round(CE, round_id=0)
        updates.append((list(data.reads), _params(model)))
    assert updates[0][0] != updates[1][0]
    assert not torch.equal(updates[0][1][0], updates[1][1][0])


def test_missing_and_conflicting_settings_are_all_reported() -> None:
    with pytest.raises(ConfigError) as missing:
        DPSGDConfig()
    text = str(missing.value)
    assert len(missing.value.problems) == 4
    for name in ("max_grad_norm", "delta", "batch_size", "target_epsilon"):
        assert name in text
    with pytest.raises(ConfigError) as both:
        DPSGDConfig(max_grad_norm=-1.0, delta=1e-5, batch_size=0, target_epsilon=1.0, noise_multiplier=1.0,
                    epochs_per_round=1.0, steps_per_round=2, clipping="fastest", device="gpu")
    assert len(both.value.problems) == 6
    assert "only one of target_epsilon or noise_multiplier" in str(both.value)


def test_dataset_dependent_problems_are_reported_together() -> None:
    config = _config(delta=0.05, batch_size=30)
    with pytest.raises(ConfigError) as caught:
        make_private(_mlp(), lambda ps: torch.optim.SGD(ps, lr=0.1), _data(n=20), config=config)
    text = str(caught.value)
    assert "1/n" in text and "choose delta <" in text and "batch_size=30 exceeds" in text


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from ()


def test_bad_arguments_are_all_reported() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    foreign = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ConfigError) as caught:
        make_private(model, foreign, Stream(), config=_config(), seed=1.5)
    text = str(caught.value)
    assert "map-style Dataset" in text and "not the model's" in text and "seed" in text
    assert "BatchNorm" in text  # the model-compatibility problem names the layer


def test_nan_loss_is_refused_and_the_round_keeps_its_charge() -> None:
    data = _data()
    data.x[:] = float("nan")
    model = _mlp()
    training = make_private(model, lambda ps: torch.optim.SGD(ps, lr=0.1), data, config=_config(), seed=8)
    before = _params(model)
    with pytest.raises(PrivacyError, match="NaN"):
        training.train_round(CE, round_id="a")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert training.rounds == ("a",) and training.epsilon() > 0
    with pytest.raises(ConfigError, match="already charged"):
        training.train_round(CE, round_id="a")


@pytest.mark.parametrize("mode", ["per-sample", "ghost", "fast"])
def test_a_round_that_fails_midway_restores_the_model(mode: str) -> None:
    calls = []

    def diverging(out, y):  # finite for two steps, then NaN
        calls.append(1)
        losses = CE(out, y)
        return losses * float("nan") if len(calls) > 2 else losses

    model = _mlp()
    training = make_private(model, lambda ps: torch.optim.SGD(ps, lr=0.5), _data(), seed=12,
                            config=_config(steps_per_round=6, clipping=mode))
    before = _params(model)
    with pytest.raises(PrivacyError, match="restored"):
        training.train_round(diverging, round_id=0)
    assert len(calls) == 3
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # The next round starts clean: no partial sums of the failed one leak into it.
    assert training.train_round(CE, round_id=1).steps == 6
    assert training.epsilon() == pytest.approx(_reference_epsilon([(1.1, 10 / 60, 12)], 1e-3), rel=0.01)


@pytest.mark.parametrize("mode", ["ghost", "fast"])
def test_scalar_loss_is_refused_where_per_sample_losses_are_needed(mode: str) -> None:
    training = make_private(_mlp(), lambda ps: torch.optim.SGD(ps, lr=0.1), _data(), seed=9,
                            config=_config(clipping=mode))
    with pytest.raises(ConfigError, match="reduction='none'"):
        training.train_round(nn.CrossEntropyLoss(), round_id=0)


def test_scalar_mean_loss_works_with_per_sample_hooks() -> None:
    results = []
    for loss in (CE, nn.CrossEntropyLoss()):
        model = _mlp(seed=10)
        training = make_private(model, lambda ps: torch.optim.SGD(ps, lr=0.5), _data(), seed=11,
                                config=_config(clipping="per-sample"))
        training.train_round(loss, round_id=0)
        results.append(_params(model))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_device_selection_and_data_loader_input() -> None:
    loader = DataLoader(_data(), batch_size=7, shuffle=True)
    training = make_private(_mlp(), lambda ps: torch.optim.SGD(ps, lr=0.1), loader, config=_config(device="auto"))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert training.device.type == expected
    assert all(p.device.type == expected for p in training.model.parameters())
    assert training.train_round(CE, round_id=0).steps == 3
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            make_private(_mlp(), lambda ps: torch.optim.SGD(ps, lr=0.1), _data(), config=_config(device="cuda"))


# One process per rank; run by the tests below with gloo on CPU and by test_privacy_gpu with NCCL.
DDP_WORKER = textwrap.dedent('''
    import os, sys, torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import TensorDataset
    from securefed.privacy.dpsgd import make_private
    from securefed.privacy.dpsgd_config import DPSGDConfig
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"])
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)  # different start on every rank: DPDDP must synchronise it
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x = torch.randn(80, 4, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, (x[:, 0] > 0).long())
    config = DPSGDConfig(max_grad_norm=1.0, delta=1e-3, batch_size=10, noise_multiplier=1.1,
                         steps_per_round=4, distributed=True, device="auto" if cuda else "cpu")
    training = make_private(model, lambda ps: torch.optim.SGD(ps, lr=0.5), data, config=config, seed=3)
    for r in range(2):
        report = training.train_round(nn.CrossEntropyLoss(reduction="none"), round_id=r)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    # Rank 1 alone fails (a NaN loss): every rank must raise; none may wait forever for the others.
    def poisoned(out, y):
        losses = nn.functional.cross_entropy(out, y, reduction="none")
        return losses * float("nan") if rank == 1 else losses
    try:
        training.train_round(poisoned, round_id=2)
        failed = "nothing"
    except Exception as exc:
        failed = type(exc).__name__
    restored = torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), flat)
    with open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w") as out:  # stdout lines of ranks interleave
        out.write(f"device={flat.device.type} steps={report.steps} same={same} eps={report.epsilon:.6f} "
                  f"failed={failed} restored={restored}")
    dist.destroy_process_group()
''')


def run_ddp_worker(tmp_path, processes: int) -> list[str]:
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc_per_node={processes}", str(script), str(tmp_path)],
                         capture_output=True, text=True, timeout=150, env=env)  # a deadlock fails here
    assert out.returncode == 0, out.stderr[-4000:]
    return [path.read_text() for path in sorted(tmp_path.glob("rank*.txt"))]


@pytest.mark.slow
def test_distributed_training_on_cpu_processes(tmp_path) -> None:
    lines = run_ddp_worker(tmp_path, 2)
    assert len(lines) == 2
    expected = _reference_epsilon([(1.1, 10 / 80, 8)], 1e-3)
    for line in lines:
        fields = dict(item.split("=") for item in line.split())
        assert fields["steps"] == "4" and fields["same"] == "True"
        assert float(fields["eps"]) == pytest.approx(expected, rel=0.01)
        # rank 1's NaN loss stopped both ranks (no deadlock), each with its model restored
        assert fields["failed"] == "PrivacyError" and fields["restored"] == "True"


def test_a_second_training_on_the_same_model_is_refused_until_closed(tmp_path) -> None:
    model, data = _mlp(), _data()
    first = make_private(model, lambda ps: torch.optim.SGD(ps, lr=0.1), data, config=_config())
    first.train_round(CE, round_id=0)
    # Flower's example builds a new engine every round, which restarts the composition.
    with pytest.raises(ConfigError, match="keep that one object"):
        make_private(model, lambda ps: torch.optim.SGD(ps, lr=0.1), data, config=_config())
    first.close()
    with pytest.raises(ConfigError, match="closed"):
        first.train_round(CE, round_id=1)
    ledger = PrivacyLedger.create(tmp_path / "l.db", identity=SiteIdentity.generate("site-b"),
                                  budget=PrivacyBudget(epsilon=5.0, delta=1e-5), accountant="pld")
    with pytest.raises(ConfigError) as caught:
        make_private(model, lambda ps: torch.optim.SGD(ps, lr=0.1), data, config=_config(), ledger=ledger)
    assert len(caught.value.problems) == 2  # delta and accountant both differ from the ledger's
    again = make_private(model, lambda ps: torch.optim.SGD(ps, lr=0.1), data, config=_config())
    assert again.train_round(CE, round_id=0).steps == 3
