"""``securefed run`` on every kind of data, split and aggregation the config accepts (subprocesses)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from test_federation_cli_run import securefed

SMALL_TRAINING = "[training]\nbatch_size = 4\n[privacy]\ntarget_epsilon = 8.0\ndelta = 1e-3\n"


def _medmnist(path, rng, size: int = 28, count: int = 90) -> None:
    images = rng.integers(0, 256, (count, size, size)).astype(np.uint8)
    labels = rng.integers(0, 3, (count, 1))
    images[labels[:, 0] == 1, 8:20, 8:20] = 255  # something to learn
    parts = {"train": slice(0, 60), "val": slice(60, 75), "test": slice(75, count)}
    np.savez(path, **{f"{k}_images": images[v] for k, v in parts.items()},
             **{f"{k}_labels": labels[v] for k, v in parts.items()})


def _image_folder(folder, rng, count: int = 48) -> None:
    folder.mkdir()
    rows = ["file,label"]
    for i in range(count):
        pixels = rng.integers(0, 120, (20, 20)).astype(np.uint8)
        if i % 2:
            pixels[5:15, 5:15] = 250
        Image.fromarray(pixels, mode="L").save(folder / f"img{i}.png")
        rows.append(f"img{i}.png,{'lesion' if i % 2 else 'normal'}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")


CASES = {
    "synthetic-seg2d": ('[federation]\nrounds = 1\n[data]\nkind = "synthetic-seg2d"\nsamples = 48\nimage_size = 32\n'
                        '[model]\nname = "unet"\n' + SMALL_TRAINING, "dice"),
    "synthetic-seg3d": ('[federation]\nrounds = 1\n[data]\nkind = "synthetic-seg3d"\nsamples = 32\nimage_size = 16\n'
                        '[model]\nname = "unet"\n' + SMALL_TRAINING, "dice"),
    "medmnist-iid": ('[federation]\nrounds = 2\nsites = 3\n[data]\nkind = "medmnist"\npath = "scans.npz"\nsplit = "iid"\n'
                     '[model]\nname = "mlp"\n' + SMALL_TRAINING, "accuracy"),
    "image-folder-dirichlet": ('[federation]\nrounds = 1\nsites = 3\n[data]\nkind = "image-folder"\npath = "images"\n'
                               'split = "dirichlet"\nalpha = 5.0\n[model]\nname = "mlp"\n' + SMALL_TRAINING, "accuracy"),
    "plain-named-sites": ('[federation]\nrounds = 2\naggregation = "plain"\nseed = 7\n[[sites]]\nname = "kings"\n'
                          'epsilon_budget = 4.0\n[[sites]]\nname = "guys"\nlearning_rate = 0.05\n', "accuracy"),
    "he-seg2d-unet": ('[federation]\nrounds = 2\nsites = 3\naggregation = "he"\n[data]\nkind = "synthetic-seg2d"\n'
                      'samples = 48\nimage_size = 32\n[model]\nname = "unet"\n' + SMALL_TRAINING, "dice"),
    "he-workers-dealer": ('[federation]\nrounds = 2\naggregation = "he"\nworkers = 2\n[he]\ndealer = "site-3"\n',
                          "accuracy"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_kind_of_data_split_and_aggregation_runs_end_to_end(tmp_path, case):
    rng = np.random.default_rng(0)
    _medmnist(tmp_path / "scans.npz", rng)
    _image_folder(tmp_path / "images", rng)
    body, metric = CASES[case]
    (tmp_path / "run.toml").write_text(body)
    done = securefed("run", "run.toml", "--run-dir", "out", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert 0.0 <= summary["final_metrics"][metric] <= 1.0
    assert all(r["failure"] is None for r in summary["rounds"])
    for site in summary["sites"].values():
        assert site["epsilon"] > 0 and site["train_records"] > 0
    if case == "plain-named-sites":
        assert set(summary["sites"]) == {"kings", "guys"} and summary["sites"]["kings"]["budget_epsilon"] == 4.0
        assert summary["coordinator"]["plaintext_updates_received"] == 4  # the baseline is in the clear
    if case.startswith("he-"):  # only sealed keys, signed ciphertexts and acknowledgements came in
        received = summary["coordinator"]["received_by_kind"]
        assert set(received) == {"KeyDeal", "ProtocolRelay/EncryptedUpload", "SumReceipt", "Acknowledgement"}, received
        assert received["ProtocolRelay/EncryptedUpload"]["messages"] == 2 * len(summary["sites"])


