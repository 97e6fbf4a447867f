"""The config schema and every recipe in configs/: parsed, validated, and run for one step."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_data import make_image_folder

from densenet.config import TrainConfig, load_config, parse_overrides
from densenet.train import run_dir, train

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_cover_the_published_setups():
    names = {p.stem for p in CONFIGS}
    for model in ("densenet40_k12", "densenet100_k12", "densenet100_k24", "densenet_bc100_k12",
                  "densenet_bc250_k24", "densenet_bc190_k40"):  # fmt: skip
        for prefix in ("cifar10", "cifar10plus", "cifar100", "cifar100plus", "svhn"):
            assert f"{prefix}_{model}" in names
    for model in ("densenet121", "densenet169", "densenet201", "densenet161", "densenet264"):
        assert {f"imagenet_{model}_step", f"imagenet_{model}_cosine"} <= names
    assert "imagenet_densenet264_k48_cosine" in names


def test_paper_recipes_have_the_papers_settings():
    c10 = load_config(CONFIGS[0].parent / "cifar10_densenet_bc100_k12.yaml", check_data=False)
    assert (c10.lr, c10.momentum, c10.nesterov, c10.weight_decay) == (0.1, 0.9, True, 1e-4)
    assert (c10.batch_size, c10.epochs, c10.schedule, c10.milestones) == (
        64, 300, "multistep", [0.5, 0.75]
    )  # fmt: skip
    assert (c10.augment, c10.drop_rate) == ("none", 0.2)
    plus = load_config(CONFIGS[0].parent / "cifar10plus_densenet_bc100_k12.yaml", check_data=False)
    assert (plus.augment, plus.drop_rate) == ("standard", 0.0)
    svhn = load_config(CONFIGS[0].parent / "svhn_densenet40_k12.yaml", check_data=False)
    assert (svhn.epochs, svhn.train_split) == (40, "train+extra")
    imagenet = load_config(CONFIGS[0].parent / "imagenet_densenet121_step.yaml", check_data=False)
    assert (imagenet.batch_size, imagenet.epochs, imagenet.step_size) == (256, 90, 30)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("recipes"), size=16, per_class=4, classes=2)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_recipe_runs_one_step(path, tiny_folder, tmp_path, monkeypatch):
    """Each recipe's optimizer, schedule, augmentation, dropout and flags on a shrunk model."""
    monkeypatch.setattr(run_dir, "plot_curves", lambda rows, path: None)  # tested elsewhere
    recipe = load_config(path, check_data=False)
    shrink = {
        "dataset": "folder", "data_dir": str(tiny_folder), "input_size": 16, "batch_size": 8,
        "epochs": 1, "workers": 0, "device": "cpu", "out": str(tmp_path / "run"),
        "model_args": {"growth_rate": 2, "block_config": [1, 1], "num_init_features": 4},
    }  # fmt: skip
    if recipe.dataset == "svhn":
        shrink["train_split"] = "train"  # a folder has no 'extra' images
    cfg = load_config(path, shrink)
    result = train(cfg, progress=False, log=lambda _: None)
    assert result.epochs == 1
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").exists()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    for key in ("lr", "schedule", "augment", "drop_rate", "weight_decay", "milestones", "model"):
        assert saved[key] == getattr(recipe, key)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lrr": 0.1}, "unknown config key 'lrr'; did you mean lr"),
        ({"lr": "fast"}, "'lr' must be float"),
        ({"epochs": 2.5}, "'epochs' must be int"),
        ({"lr": -0.1}, "lr must be > 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"num_classes": 0}, "num_classes must be >= 1"),
        ({"schedule": "linear"}, "schedule must be one of step, multistep, cosine"),
        ({"data_dir": "/no/such/dir"}, "data_dir /no/such/dir does not exist"),
        ({"dataset": "cifar10"}, "dataset cifar10 needs data_dir"),
        ({"dataset": "cifar11"}, "unknown dataset 'cifar11'"),
        ({"model": "densenet12"}, "did you mean densenet121"),
        ({"model_args": {"depth": 17}}, "depth L=17 does not fit"),
        ({"model_args": {"grwth_rate": 4}}, "model_args has unknown keys ['grwth_rate']"),
        ({"milestones": [50, 75]}, "milestones must be epoch fractions"),
        ({"schedule_epochs": 0}, "schedule_epochs must be >= 1 (or null"),
        (
            {"schedule_epochs": 2, "warmup_epochs": 2},
            "warmup_epochs (2.0) must be < schedule_epochs",
        ),
        (
            {"epochs": 3, "schedule_epochs": 2},
            "epochs (3) go past schedule_epochs (2), where the cosine schedule has reached lr 0",
        ),
        ({"amp": "fp16", "device": "cpu"}, "amp fp16 needs a CUDA device"),
    ],
)
def test_bad_configs_are_rejected_naming_the_key(overrides, message):
    with pytest.raises(ValueError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_yaml_file_errors(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("epochs: 3\nbatchsize: 4\n")
    with pytest.raises(ValueError, match="did you mean batch_size"):
        load_config(tmp_path / "typo.yaml")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("epochs: 3\nmilestones: [0.5, 0.75\nlr: 0.1\n")
    with pytest.raises(ValueError) as error:
        load_config(tmp_path / "broken.yaml")
    message = str(error.value)
    assert "broken.yaml: not valid YAML (line 3, column 3: expected ',' or ']'" in message
    assert "\n" not in message  # one line, not PyYAML's multi-line marker


def test_overrides_parse_as_yaml_values():
    values = parse_overrides(["lr=0.05", "milestones=[0.5, 0.75]", "pretrained=a.safetensors"])
    assert values == {"lr": 0.05, "milestones": [0.5, 0.75], "pretrained": "a.safetensors"}
    assert load_config(None, {"lr": 1}).lr == 1.0  # ints are fine where floats are expected
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["lr"])
    assert TrainConfig().dataset == "fashion_mnist"


def test_model_args_apply_only_when_given(tmp_path):
    from densenet.config import model_kwargs
    from densenet.zoo import get_model_spec

    for name in ("densenet121", "densenet40_k12", "densenet_bc100_k12", "densenet_bc16_k12"):
        cfg = load_config(None, {"model": name})
        assert cfg.model_args == {} and model_kwargs(cfg) == get_model_spec(name).kwargs
    kept = load_config(None, {"model": "densenet40_k12", "model_args": {"growth_rate": 6}})
    assert kept.model_args == {"growth_rate": 6} and model_kwargs(kept)["growth_rate"] == 6
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: densenet_bc100_k12\nmodel_args: {depth: 40}\n")
    assert model_kwargs(load_config(recipe))["block_config"] == (6, 6, 6)
    assert model_kwargs(load_config(recipe, {"model_args": {}}))["block_config"] == (16, 16, 16)


def test_a_runs_config_yaml_starts_a_new_run_without_its_history(tmp_path):
    from densenet.config import save_config

    cfg = load_config(None, {"lr": 0.05, "epochs": 4, "schedule_epochs": 2, "min_lr": 0.001})
    save_config(cfg, tmp_path / "config.yaml", [{"from_epoch": 2, "from_step": 9, "changed": {}}])
    assert "history:" in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("size, ok", [(1, False), (3, False), (4, True)])
def test_an_input_size_below_what_the_model_takes_is_refused_before_reading_data(size, ok):
    from densenet.config import validate

    cfg = TrainConfig(model="densenet_bc16_k12", input_size=size)  # smallest input: 4x4
    if ok:
        validate(cfg, check_data=False)
        return
    with pytest.raises(ValueError, match=f"input_size {size} is below the 4x4 pixels"):
        validate(cfg, check_data=False)


def test_yaml_floats_without_a_dot_and_impossible_schedules():
    from densenet.config import validate

    # PyYAML reads 1e-3 as a string; --set and config files both give it.
    assert load_config(None, parse_overrides(["lr=1e-3", "weight_decay=5E-4"]), check_data=False).lr == 1e-3  # fmt: skip
    with pytest.raises(ValueError, match="config key 'lr' must be float, got 'abc'"):
        load_config(None, parse_overrides(["lr=abc"]), check_data=False)
    with pytest.raises(ValueError, match=r"min_lr \(1.0\) must not exceed lr \(0.1\)"):
        validate(TrainConfig(lr=0.1, min_lr=1.0), check_data=False)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 2.0"):
        validate(TrainConfig(momentum=2.0), check_data=False)


def test_a_frozen_backbone_with_a_backbone_lr_scale_is_refused():
    from densenet.config import validate

    with pytest.raises(ValueError, match="freeze_backbone trains only the classifier"):
        validate(TrainConfig(freeze_backbone=True, backbone_lr_scale=0.1), check_data=False)
    validate(TrainConfig(freeze_backbone=True), check_data=False)
