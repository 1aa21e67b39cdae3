"""The package's public surface and its layering rules."""

from __future__ import annotations

import ast
import inspect
import pathlib
import subprocess
import sys

import pytest

import securefed
import securefed.errors as errors
import securefed.privacy as privacy
import securefed.secagg as secagg

PACKAGE = pathlib.Path(securefed.__file__).parent
HEAVY = {"torch", "opacus", "tenseal", "monai", "flwr"}
IO_AND_CLOCK = {"socket", "time", "datetime", "asyncio", "subprocess", "http", "urllib", "requests"}



@pytest.mark.parametrize("module", [securefed, secagg, errors, privacy])
def test_all_names_exist(module: object) -> None:
    for name in module.__all__:  # type: ignore[attr-defined]
        assert hasattr(module, name), f"{module.__name__}.__all__ lists missing {name}"


def test_secagg_all_matches_public_surface() -> None:
    public = {n for n, v in vars(secagg).items() if not n.startswith("_") and not inspect.ismodule(v)}
    assert public == set(secagg.__all__) - {"attacks"}


def test_error_hierarchy_subclasses_builtins() -> None:
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.MissingDependencyError, ImportError)
    for cls in (errors.DecryptionError, errors.InvalidSignatureError, errors.ReconstructionError):
        assert issubclass(cls, errors.CryptoError) and issubclass(cls, ValueError)
    for cls in (errors.MalformedMessageError, errors.UnexpectedMessageError, errors.ProtocolAbort):
        assert issubclass(cls, errors.ProtocolError)
    assert issubclass(errors.PrivacyBudgetExceeded, errors.PrivacyError)
    assert issubclass(errors.UnsupportedMechanismError, errors.PrivacyError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.SecurefedError)


def test_config_error_lists_every_problem() -> None:
    exc = errors.ConfigError(["first problem", "second problem"])
    assert exc.problems == ["first problem", "second problem"]
    assert "first problem" in str(exc) and "second problem" in str(exc)


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("layer", ["primitives", "secagg", "he"])
def test_cores_import_no_heavy_library_no_io_no_clock(layer: str) -> None:
    for path in (PACKAGE / layer).glob("*.py"):
        if path.name.startswith("tenseal_"):  # the HE layer's adapters to TenSEAL
            continue
        bad = _imports(path) & (HEAVY | IO_AND_CLOCK)
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_importing_securefed_loads_no_heavy_library() -> None:
    code = "import sys, securefed, securefed.secagg; print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % HEAVY
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_is_too_long() -> None:
    for path in PACKAGE.rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 500, f"{path} is over 500 lines"


# The adapters of the privacy layer: the only privacy modules allowed to import torch/opacus/monai.
PRIVACY_ADAPTERS = {"model_compat.py", "losses.py", "dpsgd.py", "dpsgd_data.py", "dpsgd_checks.py", "fast_clipping.py", "fast_clipping_layers.py"}


def test_privacy_core_imports_no_heavy_library_and_no_crypto_protocol() -> None:
    for path in (PACKAGE / "privacy").glob("*.py"):
        imported = _imports(path)
        text = path.read_text()
        assert "securefed.secagg" not in text and "securefed.he" not in text, f"{path.name} reaches into a protocol layer"
        if path.name not in PRIVACY_ADAPTERS:
            bad = imported & HEAVY
            assert not bad, f"{path.name} imports {sorted(bad)}; only adapter modules may"


def test_importing_securefed_privacy_loads_no_heavy_library() -> None:
    code = "import sys, securefed.privacy as p; p.epsilon; p.PrivacyLedger; print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % HEAVY
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# The adapters of the federation, model and data layers: the only modules there that may import torch/monai.
RUNTIME_ADAPTERS = {"federation": {"local_training.py", "evaluation.py", "workers.py"},
                    "models": {"factory.py", "networks.py"}, "data": {"embedded.py"}}


@pytest.mark.parametrize("layer", sorted(RUNTIME_ADAPTERS))
def test_runtime_layers_import_heavy_libraries_only_in_adapters(layer: str) -> None:
    for path in (PACKAGE / layer).glob("*.py"):
        if path.name not in RUNTIME_ADAPTERS[layer]:
            bad = _imports(path) & HEAVY
            assert not bad, f"{layer}/{path.name} imports {sorted(bad)}; only adapter modules may"


def test_the_coordinator_module_cannot_reach_a_site_its_data_or_training() -> None:
    text = (PACKAGE / "federation" / "coordinator.py").read_text()
    for forbidden in ("federation.site ", "federation.site import", "workspace", "local_training", "securefed.data",
                      "securefed.models", "securefed.privacy"):
        assert forbidden not in text, f"coordinator.py mentions {forbidden!r}"


def test_lower_layers_never_import_the_federation() -> None:
    for layer in ("primitives", "secagg", "he", "privacy", "data", "models"):
        for path in (PACKAGE / layer).glob("*.py"):
            assert "securefed.federation" not in path.read_text(), f"{layer}/{path.name}"


def test_reading_a_federation_config_loads_no_heavy_library() -> None:
    code = ("import sys, securefed.federation as f, securefed.data, securefed.models; c = f.default_config(); "
            "f.validate(c); print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
