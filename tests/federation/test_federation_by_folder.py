"""One sub-folder per hospital: the sites are named after the folders and each trains on its own."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from securefed.federation.config import load_config

from test_federation_cli_run import securefed


def _hospital(folder, rng, count: int = 24) -> None:
    folder.mkdir(parents=True)
    rows = ["file,label"]
    for i in range(count):
        label = i % 2
        pixels = rng.integers(0, 90, (16, 16)).astype(np.uint8)
        if label:
            pixels[4:12, 4:12] = 230  # a bright square marks the positive class
        Image.fromarray(pixels, mode="L").save(folder / f"scan-{i}.png")
        rows.append(f"scan-{i}.png,{'lesion' if label else 'clear'}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")


def test_by_folder_names_the_sites_after_the_hospitals_and_runs(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("kings", "guys", "st-thomas"):
        _hospital(tmp_path / "scans" / name, rng)
    config_file = tmp_path / "federation.toml"
    config_file.write_text("""
[federation]
rounds = 2
[secagg]
neighbors = "all"
[data]
kind = "image-folder"
path = "scans"
split = "by-folder"
[model]
name = "mlp"
[training]
batch_size = 4
learning_rate = 0.5
[privacy]
target_epsilon = 8.0
delta = 1e-3
""")
    config = load_config(config_file)
    assert config.site_names() == ["guys", "kings", "st-thomas"]
    done = securefed("run", str(config_file), "--run-dir", str(tmp_path / "run"), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert set(summary["sites"]) == {"guys", "kings", "st-thomas"}
    assert all(0 < s["epsilon"] <= 8.0 for s in summary["sites"].values())
    assert 0.0 <= summary["final_metrics"]["accuracy"] <= 1.0
    assert all((tmp_path / "run" / "sites" / name / "ledger.sqlite").exists() for name in summary["sites"])


def test_by_folder_without_sub_folders_is_a_clear_error(tmp_path):
    (tmp_path / "scans").mkdir()
    config_file = tmp_path / "federation.toml"
    config_file.write_text('[data]\nkind = "image-folder"\npath = "scans"\nsplit = "by-folder"\n')
    done = securefed("run", str(config_file), cwd=tmp_path)
    assert done.returncode == 2 and "sub-folder" in done.stderr and "Traceback" not in done.stderr
