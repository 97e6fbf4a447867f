"""The command line in the user's terms: errors name flags, one did-you-mean, defaults in --help,
recipes by name, export format from the file name, notices for random weights, quiet int8."""

from __future__ import annotations

import importlib
import json
import logging
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import densenet
from densenet.cli import CLIError, main
from densenet.cli.export import output_format
from densenet.factory import create_model
from densenet.recipes import find_recipe

SRC = Path(densenet.__file__).parent
REPO = SRC.parents[1]


def test_unknown_command_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["trian", "--epochs", "1"])
    assert stop.value.code == 2
    assert "unknown command 'trian'; did you mean train?" in capsys.readouterr().err


def test_every_did_you_mean_comes_from_one_helper():
    users = [p.relative_to(SRC) for p in SRC.rglob("*.py") if "difflib" in p.read_text()]
    assert users == [Path("messages.py")]


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size BATCH_SIZE (default: 64)" in text
    assert "--no-progress" in text
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 2)" in text and "(default: None)" not in text


def test_export_format_from_the_file_name():
    assert output_format("model.pt2", None) == "exported-program"
    assert output_format("model.onnx", None) == "onnx"
    assert output_format("model.onnx", "onnx") == "onnx"
    with pytest.raises(CLIError, match=r"--out model.bin: name the file .onnx or .pt2"):
        output_format("model.bin", None)
    with pytest.raises(CLIError, match=r"--format onnx writes a .onnx file"):
        output_format("model.pt2", "onnx")


def test_export_pt2_by_extension_with_random_weights_notice(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DENSENET_PROGRESS_INTERVAL", "0")
    out = tmp_path / "tiny.pt2"
    assert main(["export", "--model", "densenet_bc16_k12", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["format"] == "exported-program" and report["ok"] and out.is_file()
    assert "densenet_bc16_k12 has random weights (no --pretrained)" in captured.err
    assert "verifying export: 4 img in " in captured.err  # batches of 1 and 3


def test_train_print_config_resolves_a_recipe_by_name(capsys):
    argv = ["train", "--config", "cifar10plus_densenet_bc100_k12", "--set", "epochs=3"]
    assert main([*argv, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    recipe = yaml.safe_load((REPO / "configs/cifar10plus_densenet_bc100_k12.yaml").read_text())
    assert printed["model"] == recipe["model"] == "densenet_bc100_k12"
    assert printed["epochs"] == 3 and printed["lr"] == recipe["lr"]
    assert "model_args" in printed and "seed" in printed  # every key, not only the recipe's


def test_unknown_recipe_names_the_flag_and_the_closest(capsys):
    assert main(["train", "--config", "cifar10plus_densenet_bc10_k12", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "--config 'cifar10plus_densenet_bc10_k12' is neither a file nor a recipe name" in err
    assert "did you mean cifar10plus_densenet_bc100_k12" in err


def test_recipe_paths_still_work(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("epochs: 1\n")
    assert find_recipe(own) == own
    assert find_recipe("svhn_densenet40_k12.yaml") == REPO / "configs/svhn_densenet40_k12.yaml"


@pytest.mark.slow
def test_recipes_ship_in_the_wheel_and_are_found_there(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("densenet-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    shipped = {p.name for p in (site / "densenet" / "configs").glob("*.yaml")}
    assert shipped == {p.name for p in (REPO / "configs").glob("*.yaml")}
    found = subprocess.run(
        [sys.executable, "-c", "from densenet.recipes import find_recipe; "
         "print(find_recipe('imagenet_densenet121_cosine'))"],
        capture_output=True, text=True, env={"PYTHONPATH": str(site)}, timeout=120, check=True,
    )  # fmt: skip
    assert Path(found.stdout.strip()) == site / "densenet/configs/imagenet_densenet121_cosine.yaml"
    # Every package and the ImageNet class list are in the wheel, and read from there.
    check = (
        "import densenet, densenet.catalog as c, densenet.data, densenet.hub, densenet.train; "
        "print(densenet.__file__, len(c.imagenet_class_names()))"
    )
    found = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True,
        env={"PYTHONPATH": str(site)}, timeout=120, check=True,
    )  # fmt: skip
    assert found.stdout.split() == [str(site / "densenet" / "__init__.py"), "1000"]


def test_int8_calibration_quiet_unless_verbose(caplog):
    from densenet.quantization import quantize_onnx

    model = create_model("densenet_bc16_k12").eval()
    batches = [torch.randn(2, 3, 32, 32)]
    with caplog.at_level(logging.WARNING):
        quantize_onnx(model, batches)
        assert not caplog.records
        quantize_onnx(model, batches, verbose=True)
    # onnxruntime's advice and one note per quantized conv
    assert sum("Expected bias" in r.getMessage() for r in caplog.records) > 3


def test_errors_name_flags_not_python_calls(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(image)
    state_dict_only = tmp_path / "plain.pth"
    torch.save(create_model("densenet_bc16_k12").state_dict(), state_dict_only)
    cases = {
        ("--model", "densenet121", "--pretrained", "densnet121.tv_in1k"): (
            "--pretrained 'densnet121.tv_in1k' is no weights tag, URL or existing file; did you "
            "mean densenet121.tv_in1k",
            "`densenet models --weights` lists the tags",
        ),
        ("--model", "densenet264", "--pretrained", "default"): (
            "densenet264 has no published weights; pass --pretrained a file or URL",
        ),
        ("--model", "densenet121", "--pretrained", "densenet169.tv_in1k"): (
            "use --model densenet169.tv_in1k --pretrained default",
        ),
        ("--checkpoint", str(state_dict_only)): (
            "--model NAME with --pretrained FILE; the weights look like densenet_bc16_k12",
        ),
    }
    for argv, expected in cases.items():
        assert main(["predict", str(image), *argv]) == 2
        err = capsys.readouterr().err
        assert all(text in err for text in expected), err
        assert "pretrained=" not in err and "create_model(" not in err and "()" not in err


def test_models_suggests_a_name_for_a_typo(capsys):
    assert main(["models", "densenet12"]) == 2
    assert "no model matches 'densenet12'; did you mean densenet121" in capsys.readouterr().err
    assert main(["models", "zz*"]) == 2
    assert "did you mean" not in capsys.readouterr().err


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """``densenet models --json | head -1``: no BrokenPipeError traceback, the shell's 141."""
    command = [str(Path(sys.executable).parent / "densenet"), "models", "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader leaves before the command writes
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141, err
    assert err == ""


def test_a_flag_typo_names_the_command_and_the_closest_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--modle", "densenet121"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: densenet train ")
    assert error.splitlines()[-1] == (
        "densenet train: error: unrecognized argument --modle; did you mean --model?"
    )
    with pytest.raises(SystemExit):
        main(["export", "--model", "densenet121", "--out", "m.onnx", "--optimise=1"])
    assert "unrecognized argument --optimise; did you mean --optimize?" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the typo, not the required --model it was meant to give
        main(["eval", "--modle", "densenet121"])
    assert "unrecognized argument --modle; did you mean --model?" in capsys.readouterr().err


def test_random_weights_note_offers_only_published_weights(capsys):
    from argparse import Namespace

    from densenet.cli._common import random_weights_notice

    for model in ("densenet121", "densenet_bc16_k12"):
        random_weights_notice(Namespace(command="export", model=model, pretrained=None))
    published, unpublished = capsys.readouterr().err.splitlines()
    assert published.endswith("add --pretrained default for the published ones")
    assert unpublished == (
        "densenet export: note: densenet_bc16_k12 has random weights (no --pretrained); none are "
        "published for it (--pretrained takes a weights file or URL)"
    )


# The least each command's parser accepts: enough to reach its handler.
MODEL_COMMANDS = {
    "eval": ["eval", "--model", "densenet_bc16_k12"],
    "predict": ["predict", "--model", "densenet_bc16_k12", "image.png"],
    "export": ["export", "--model", "densenet_bc16_k12", "--out", "m.onnx"],
    "bench": ["bench", "--model", "densenet_bc16_k12"],
}


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_ctrl_c_in_a_command_is_one_line_and_status_130(command, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"densenet.cli.{command}"), "run", interrupted)
    assert main(MODEL_COMMANDS[command]) == 130
    assert capsys.readouterr().err == f"densenet {command}: interrupted\n"


def test_ctrl_c_to_a_running_bench_process_exits_130_without_a_traceback():
    """A real SIGINT to ``densenet bench`` once it has started (its note is on stderr)."""
    command = [str(Path(sys.executable).parent / "densenet"), *MODEL_COMMANDS["bench"]]
    command += ["--batch", "1", "--iters", "100000000", "--threads", "1", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = process.stderr.readline()
        assert "has random weights" in first, first
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, rest
    assert rest == "densenet bench: interrupted\n"
