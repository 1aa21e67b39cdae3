"""ModelConfig and model_problems: names, features, fit to the task - all without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from securefed.data import TaskKind, TaskSpec
from securefed.errors import ConfigError
from securefed.models import MODEL_NAMES, ModelConfig, ModelName, model_problems, resolved_name

TABULAR = TaskSpec(kind=TaskKind.CLASSIFICATION, input_shape=(30,), spatial_dims=0, num_classes=2)
IMAGES = TaskSpec(kind=TaskKind.CLASSIFICATION, input_shape=(1, 28, 28), spatial_dims=2, num_classes=9)
MASKS_2D = TaskSpec(kind=TaskKind.SEGMENTATION, input_shape=(1, 64, 64), spatial_dims=2, num_classes=2)
MASKS_3D = TaskSpec(kind=TaskKind.SEGMENTATION, input_shape=(1, 32, 32, 32), spatial_dims=3, num_classes=2)


def test_importing_the_config_side_loads_no_torch() -> None:
    code = ("import sys, securefed.models as m, securefed.data as d; "
            "spec = d.TaskSpec(kind='segmentation', input_shape=(1, 8, 8), spatial_dims=2, num_classes=2); "
            "assert m.model_problems(m.ModelConfig(name='unet'), spec) == []; "
            "print(sorted(x for x in sys.modules if x.split('.')[0] in ('torch', 'monai', 'opacus')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("given, stored", [("auto", ModelName.AUTO), ("DenseNet121", ModelName.DENSENET121),
                                           ("BasicUNet", ModelName.BASICUNET), ("seg_res_net", ModelName.SEGRESNET),
                                           (" UNet ", ModelName.UNET), ("MLP", ModelName.MLP)])
def test_names_are_case_insensitive_and_stored_as_the_enum(given: str, stored: ModelName) -> None:
    config = ModelConfig(name=given)
    assert config.name is stored and config.name == stored.value
    assert stored.value in MODEL_NAMES


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"'densnet121' is not a known network \(did you mean 'densenet121'\?\)"):
        ModelConfig(name="densnet121")
    with pytest.raises(ConfigError) as info:
        ModelConfig(name="transformer")
    assert "did you mean" not in str(info.value) and "segresnet" in str(info.value)


def test_every_field_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig(name=3, factory="not a path", hidden=(0,), features=("a",))
    assert len(info.value.problems) == 4
    text = str(info.value)
    assert "package.module:function" in text and "hidden" in text and "features" in text


def test_lists_become_tuples_and_name_with_factory_is_refused() -> None:
    config = ModelConfig(hidden=[32, 16], features=[4, 8])
    assert config.hidden == (32, 16) and config.features == (4, 8)
    with pytest.raises(ConfigError, match="either name"):
        ModelConfig(name="unet", factory="pkg.mod:build")
    assert ModelConfig(factory=" pkg.mod:Builder.make ").factory == "pkg.mod:Builder.make"


@pytest.mark.parametrize("spec, name", [(TABULAR, ModelName.MLP), (IMAGES, ModelName.DENSENET121),
                                        (MASKS_2D, ModelName.UNET), (MASKS_3D, ModelName.UNET)])
def test_auto_picks_by_task(spec: TaskSpec, name: ModelName) -> None:
    assert resolved_name(ModelConfig(), spec) is name
    assert model_problems(ModelConfig(), spec) == []


@pytest.mark.parametrize("name", ["unet", "basicunet", "segresnet"])
def test_segmentation_network_for_classification_is_refused_with_the_fix(name: str) -> None:
    problems = model_problems(ModelConfig(name=name), IMAGES)
    assert len(problems) == 1 and "segmentation network" in problems[0] and "densenet121" in problems[0]
    assert "mlp" in model_problems(ModelConfig(name=name), TABULAR)[0]


@pytest.mark.parametrize("name", ["mlp", "densenet121"])
def test_classifier_for_segmentation_is_refused_with_the_fix(name: str) -> None:
    problems = model_problems(ModelConfig(name=name), MASKS_2D)
    assert len(problems) == 1 and "classification network" in problems[0] and "unet" in problems[0]


def test_densenet_on_tabular_data_and_mlp_on_images() -> None:
    assert "needs images" in model_problems(ModelConfig(name="densenet121"), TABULAR)[0]
    assert model_problems(ModelConfig(name="mlp"), IMAGES) == []  # flattened: a small-image baseline
    huge = TaskSpec(kind=TaskKind.CLASSIFICATION, input_shape=(1, 512, 512, 512), spatial_dims=3, num_classes=2)
    assert "first layer" in model_problems(ModelConfig(name="mlp"), huge)[0]


@pytest.mark.parametrize("name, features, fragment", [
    ("unet", (8,), "at least 2"),
    ("basicunet", (8, 16, 32), "exactly 6"),
    ("segresnet", (8, 12, 32), "e.g. (8, 16, 32)"),
    ("densenet121", (8, 16), "widths are fixed"),
])
def test_features_must_suit_the_network(name: str, features: tuple[int, ...], fragment: str) -> None:
    spec = IMAGES if name == "densenet121" else MASKS_2D
    problems = model_problems(ModelConfig(name=name, features=features), spec)
    assert len(problems) == 1 and fragment in problems[0]


def test_features_on_the_mlp_point_to_hidden() -> None:
    assert "use hidden" in model_problems(ModelConfig(name="mlp", features=(8,)), TABULAR)[0]


def test_task_spec_problems() -> None:
    tabular_masks = TaskSpec(kind=TaskKind.SEGMENTATION, input_shape=(30,), spatial_dims=0, num_classes=2)
    assert "needs images" in model_problems(ModelConfig(), tabular_masks)[0]
    one_class = TaskSpec(kind=TaskKind.CLASSIFICATION, input_shape=(30,), spatial_dims=0, num_classes=1)
    assert any("at least 2 classes" in p for p in model_problems(ModelConfig(), one_class))
    wrong_rank = TaskSpec(kind=TaskKind.SEGMENTATION, input_shape=(64, 64), spatial_dims=2, num_classes=2)
    assert any("does not fit spatial_dims=2" in p for p in model_problems(ModelConfig(), wrong_rank))
    # a factory's own network is checked when it is built, the task still here
    assert model_problems(ModelConfig(factory="pkg.mod:build"), MASKS_2D) == []
    assert model_problems(ModelConfig(factory="pkg.mod:build"), one_class) != []
