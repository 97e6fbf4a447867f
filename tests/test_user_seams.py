"""What a newcomer's walk through the README found at the seams: which folder a run validates
on, eval finding the checkpoint's data, exported files given back to the tools, hidden files in
image folders, and what fine-tuning keeps from the weights."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from inference_helpers import save_checkpoint, shared_data, tiny_model
from PIL import Image
from test_data import SHARED, make_image_folder

from densenet.cli import main
from densenet.config import load_config
from densenet.data import FolderImages
from densenet.io import load_state
from densenet.predict import list_images
from densenet.train.model import build_model

TINY_MODEL = "{growth_rate: 2, block_config: [1, 1], num_init_features: 4}"


def add_split(root: Path, split: str, per_class: int, classes: tuple[str, ...] = ("c0", "c1")):
    rng = np.random.default_rng(len(split))
    for name in classes:
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{n}.png")
    return root


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--dataset", "folder", "--data-dir", str(data), "--out", str(out),
        "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu",
        "--no-progress", "--set", f"model_args={TINY_MODEL}", "--set", "threads=1", *extra,
    ]  # fmt: skip


def run(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def three_splits(tmp_path_factory) -> Path:
    """train/ (16 per class), val/ (3 per class) and test/ (16 per class)."""
    root = make_image_folder(tmp_path_factory.mktemp("splits"), size=8, per_class=16)
    return add_split(root, "val", 3)


@pytest.fixture(scope="module")
def trained(three_splits, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(train_args(three_splits, out)) == 0
    return {"run": out, "best": out / "checkpoints" / "best.safetensors"}


def test_a_folder_with_val_and_test_validates_on_val_and_says_so(three_splits, tmp_path, capsys):
    status, out, err = run(train_args(three_splits, tmp_path / "r"), capsys)
    assert status == 0, err
    assert f"validating on {three_splits}/val/" in err and "test/ stays unseen" in err
    assert "done: folder val/ top-1" in out
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["val_split"] == "val"


def test_a_recipe_validating_on_test_says_so_on_a_folder_with_val(three_splits, tmp_path, capsys):
    status, _, err = run(train_args(three_splits, tmp_path / "r", "--set", "val_split=test"), capsys)  # fmt: skip
    assert status == 0, err
    assert f"validating on {three_splits}/test/ (val_split: test)" in err
    assert "--set val_split=val validates on val/" in err


def test_a_folder_with_test_only_validates_on_test_and_names_it(tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", size=8, per_class=16)  # train/ and test/
    status, out, err = run(train_args(data, tmp_path / "r"), capsys)
    assert status == 0, err
    assert "has no val/ sub-folder: validating on test/" in err
    assert "done: folder test/ top-1" in out


def test_eval_reads_the_data_the_checkpoint_was_trained_on(trained, three_splits, capsys):
    status, out, err = run(["eval", "--checkpoint", str(trained["best"]), "--json"], capsys)
    assert status == 0, err
    assert f"--data-dir {three_splits.resolve()} (the checkpoint's training data)" in err
    assert '"split": "test"' in out and '"images": 32' in out  # test/: 2 classes x 16
    assert load_state(trained["best"])[1]["data_dir"] == str(three_splits.resolve())


def test_eval_says_when_the_checkpoints_data_is_gone(trained, tmp_path, capsys):
    state, meta = load_state(trained["best"])
    from densenet.io import save_state

    moved = save_state(tmp_path / "moved.safetensors", state, {**meta, "data_dir": "/no/such"})
    status, _, err = run(["eval", "--checkpoint", str(moved)], capsys)
    assert status == 2
    assert "trained on folder from /no/such, which does not exist here; give --data-dir" in err


def test_exported_files_given_back_as_checkpoints_are_named_as_exports(
    trained, three_splits, tmp_path, capsys
):
    image = _image(tmp_path)
    for suffix, expected in ((".onnx", "an ONNX graph"), (".pt2", "torch.export program")):
        exported = tmp_path / f"m{suffix}"
        status, _, err = run(
            ["export", "--checkpoint", str(trained["best"]), "--out", str(exported)], capsys
        )
        assert status == 0, err
        for command in (
            ["predict", "--checkpoint", str(exported), str(image)],
            train_args(three_splits, tmp_path / "x", "--pretrained", str(exported)),
        ):
            status, _, err = run(command, capsys)
            assert status == 2 and expected in err and "Traceback" not in err, err


def test_a_run_directory_as_checkpoint_names_the_file_to_give(trained, tmp_path, capsys):
    status, _, err = run(["predict", "--checkpoint", str(trained["run"]), str(_image(tmp_path))], capsys)  # fmt: skip
    assert status == 2
    assert f"give {trained['run']}/checkpoints/best.safetensors" in err


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "one.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return path


def test_hidden_files_and_folders_are_not_images(tmp_path):
    root = make_image_folder(tmp_path / "d", size=8, per_class=2)
    (root / "train" / "c0" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    hidden = root / "train" / ".thumbnails"
    hidden.mkdir()
    shutil.copy(root / "train" / "c0" / "0.png", hidden / "0.png")
    classes, samples = FolderImages.scan(root, "train")
    assert classes == ["c0", "c1"] and len(samples) == 4
    assert all("._" not in member for member, _ in samples)
    found = list_images([root / "train"])
    assert len(found) == 4 and not any(p.name.startswith(".") for p in found)
    assert not any(".thumbnails" in p.parts for p in found)


def test_fine_tuning_says_it_keeps_a_classifier_of_other_class_names(trained, tmp_path, capsys):
    other = add_split(tmp_path / "other", "train", 8, ("cat", "dog"))
    add_split(other, "val", 2, ("cat", "dog"))
    args = train_args(other, tmp_path / "ft", "--pretrained", str(trained["best"]))
    status, _, err = run(args, capsys)
    assert status == 0, err
    assert "keeping its classifier (as many classes as folder: 2)" in err
    assert "(c0 -> cat, ...); --set reset_classifier=true starts a new one" in err
    source = load_state(trained["best"])[0]["model"]
    for reset in (False, True):
        cfg = load_config(None, {"dataset": "folder", "data_dir": str(other),
                                 "pretrained": str(trained["best"]), "reset_classifier": reset})  # fmt: skip
        head = build_model(cfg, 2, 3).state_dict()["classifier.weight"]
        assert head.equal(source["classifier.weight"]) != reset
        assert (
            build_model(cfg, 2, 3)
            .state_dict()["features.conv0.weight"]
            .equal(source["features.conv0.weight"])
        )


def test_int8_eval_of_a_folder_without_splits_says_it_calibrates_on_what_it_scores(
    trained, tmp_path, capsys
):
    flat = tmp_path / "flat"
    add_split(tmp_path / "tmp", "all", 6)
    shutil.move(tmp_path / "tmp" / "all", flat)
    status, _, err = run(
        [
            "eval",
            "--checkpoint",
            str(trained["best"]),
            "--dataset",
            "folder",
            "--data-dir",
            str(flat),
            "--precision",
            "int8",
            "--batch-size",
            "4",
        ],  # fmt: skip
        capsys,
    )
    assert status == 0, err
    assert "int8 calibrates on 12 images of the images evaluated" in err
    assert "held out for validation" not in err


def test_weights_of_an_unregistered_layout_run_with_the_model_args_the_error_names(capsys):
    checkpoint = SHARED / "checkpoints" / "jasonwei05_densenet_cifar10.pth"
    samples = sorted((SHARED / "test-samples").glob("cifar10_*.png"))
    if not checkpoint.exists() or not samples:
        pytest.skip(f"real checkpoint or samples not found under {SHARED}")
    status, _, err = run(["predict", "--checkpoint", str(checkpoint), str(samples[0])], capsys)
    assert status == 2
    flags = err.split("(command line: ")[1].split(")")[0]
    args = shlex.split(flags.replace("NAME", "densenet_bc100_k12").replace("FILE", str(checkpoint)))
    status, out, err = run(["predict", *args, "--json", "--topk", "1", *map(str, samples)], capsys)
    assert status == 0, err
    rows = json.loads(out)["predictions"]
    # cifar10_<n>_<class>.png; the checkpoint scores 79.7% on the test set
    right = sum(r["top"][0]["index"] == int(Path(r["file"]).stem.split("_")[-1]) for r in rows)
    assert len(rows) == len(samples) and right >= 0.6 * len(rows), rows
    # The .pth records no normalization: the one used is named, and --mean/--std set the author's.
    assert "records no normalization: using densenet_bc100_k12's mean [0.4914" in err
    authors = ["--mean", "0.4914,0.4822,0.4465", "--std", "0.2023, 0.1994, 0.2010"]
    status, out, err = run(["predict", *args, "--json", "--topk", "1", *authors, str(samples[0])], capsys)  # fmt: skip
    assert status == 0 and "records no normalization" not in err, err
    assert json.loads(out)["predictions"][0]["top"][0]["probability"] != rows[0]["top"][0]["probability"]  # fmt: skip
    status, _, err = run(["predict", *args, "--mean", "0.5", str(samples[0])], capsys)
    assert status == 2 and "--mean needs 3 values (one per input channel)" in err
    with pytest.raises(SystemExit):
        main(["predict", *args, "--std", "0.2;0.2;0.2", str(samples[0])])
    assert "--std: expected numbers separated by commas" in capsys.readouterr().err


def test_a_damaged_zip_as_data_dir_is_named_as_such(tmp_path, capsys):
    damaged = tmp_path / "images.zip"
    damaged.write_bytes(b"PK\x03\x04 cut short")
    for command in (train_args(damaged, tmp_path / "r"),
                    ["eval", "--model", "densenet_bc16_k12", "--dataset", "folder", "--data-dir", str(damaged)]):  # fmt: skip
        status, _, err = run(command, capsys)
        assert status == 2 and "is a file but not a readable .zip" in err, err


def test_fine_tuning_names_other_channels_and_normalization_of_the_weights(
    trained, three_splits, tmp_path, capsys
):
    from densenet.io import save_state

    state, meta = load_state(trained["best"])
    gray = {**meta, "mean": [0.286], "std": [0.353], "input_size": [1, 8, 8]}
    weights = save_state(tmp_path / "gray.safetensors", state, gray)
    settings = {"dataset": "folder", "data_dir": str(three_splits), "pretrained": str(weights)}
    cfg = load_config(None, settings)
    from densenet import data

    build_model(cfg, 2, 3, data.dataset_info("folder", three_splits))
    err = capsys.readouterr().err
    assert "weights for 1-channel input, folder gives 3 channels" in err
    assert "normalized with mean (0.286) std (0.353); this run normalizes folder with mean " in err


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_exports_carry_class_names_and_normalization(trained, tmp_path, capsys, suffix):
    from densenet.export import read_export_metadata

    out = tmp_path / f"m{suffix}"
    status, printed, err = run(["export", "--checkpoint", str(trained["best"]), "--out", str(out)], capsys)  # fmt: skip
    assert status == 0, err
    meta = read_export_metadata(out)
    saved = load_state(trained["best"])[1]
    assert meta["class_names"] == saved["class_names"] == ["c0", "c1"]
    assert meta["mean"] == saved["mean"] and meta["std"] == saved["std"]
    assert meta["input_size"] == [3, 8, 8] and meta["task"] == "multiclass"
    assert meta["precision"] == "fp32"
    assert f"normalized with mean {json.dumps(saved['mean'])}" in printed


def test_the_int8_graph_carries_the_metadata_too(trained, tmp_path):
    import torch

    from densenet.export import export_model, read_export_metadata
    from densenet.factory import create_model

    model = create_model(pretrained=trained["best"]).eval()
    calibration = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    out = export_model(model, tmp_path / "q.onnx", "onnx", input_size=(8, 8), precision="int8",
                       calibration=calibration, metadata={"class_names": '["c0", "c1"]'})  # fmt: skip
    assert read_export_metadata(out)["class_names"] == ["c0", "c1"]


def test_the_validation_images_are_those_of_val(three_splits):
    import torch

    from densenet.train.inputs import build_data

    cfg = load_config(
        None, {"dataset": "folder", "data_dir": str(three_splits), "workers": 0, "batch_size": 8}
    )
    assert len(build_data(cfg, torch.device("cpu")).val_loader.dataset) == 6  # val/: 2 x 3


def test_eval_of_a_flat_folder_the_model_was_trained_on_scores_the_held_out_part(tmp_path, capsys):
    flat = add_split(tmp_path / "d", "flat", 20) / "flat"  # flat/c0/*.png, flat/c1/*.png
    out = tmp_path / "run"
    assert main(train_args(flat, out)) == 0
    status, printed, err = run(["eval", "--checkpoint", str(out / "checkpoints" / "best.safetensors"), "--json"], capsys)  # fmt: skip
    assert status == 0, err
    assert "has no train/, val/ or test/ sub-folders, and the model was trained on it" in err
    assert "evaluating the part training held out" in err
    assert '"split": "val"' in printed and '"images": 4' in printed  # 10% of 2 x 20


def test_an_older_run_checkpoint_finds_its_data_in_the_runs_config(trained, three_splits, tmp_path, capsys):  # fmt: skip
    from densenet.io import save_state

    state, meta = load_state(trained["best"])
    run_dir = tmp_path / "old"
    (run_dir / "checkpoints").mkdir(parents=True)
    old = save_state(run_dir / "checkpoints" / "best.safetensors", state, {k: v for k, v in meta.items() if k != "data_dir"})  # fmt: skip
    for data_dir, found in ((str(three_splits.resolve()), True), ("relative/images", False)):
        (run_dir / "config.yaml").write_text(
            yaml.safe_dump({"dataset": "folder", "data_dir": data_dir})
        )
        status, _, err = run(["eval", "--checkpoint", str(old)], capsys)
        assert (status == 0) == found, err
        assert ("(the checkpoint's training data)" in err) == found
        if not found:  # a relative path was relative to where training ran: not guessed
            assert "dataset folder needs --data-dir" in err


def test_a_missing_recorded_folder_is_an_error_but_a_built_in_dataset_falls_back(capsys):
    import argparse

    from densenet.cli import CLIError
    from densenet.cli.eval import _data_dir

    args = argparse.Namespace(data_dir=None)
    assert _data_dir(args, "cifar10", "/no/such") is None
    assert "training data /no/such is not here: reading cifar10 from its default place" in capsys.readouterr().err  # fmt: skip
    with pytest.raises(CLIError, match="trained on folder from /no/such, which does not exist"):
        _data_dir(args, "folder", "/no/such")


@pytest.mark.parametrize(
    "model_args, expected",
    [("{foo: 1}", "--model-args: unknown DenseNet argument 'foo'"),
     ("{pretrained: true}", "--model-args takes architecture arguments, not pretrained"),
     ("[1, 2]", "--model-args must be a mapping")],
)  # fmt: skip
def test_bad_model_args_are_one_line_errors(tmp_path, capsys, model_args, expected):
    command = ["predict", "--model", "densenet_bc16_k12", "--model-args", model_args, str(_image(tmp_path))]  # fmt: skip
    status, _, err = run(command, capsys)
    assert status == 2 and expected in err and "Traceback" not in err, err


def test_reset_classifier_needs_pretrained_and_a_pixel_limit_must_be_a_count(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="reset_classifier goes with pretrained"):
        load_config(None, {"reset_classifier": True})
    from densenet.data import load_image

    monkeypatch.setenv("DENSENET_MAX_IMAGE_PIXELS", "0")
    with pytest.raises(ValueError, match="'0' is not a number of pixels"):
        load_image(_image(tmp_path))


def test_small_images_of_several_sizes_train_read_per_image(tmp_path, capsys):
    data_dir = add_split(tmp_path / "d", "train", 8)
    add_split(data_dir, "val", 2)
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(data_dir / "train" / "c0" / "odd.png")
    status, _, err = run(train_args(data_dir, tmp_path / "r"), capsys)
    assert status == 0, err
    assert "images differ in size ([(8, 8), (12, 10)]...): read per image and resized" in err
    status, _, err = run(train_args(data_dir, tmp_path / "r2", "--set", "in_memory=true"), capsys)
    assert status == 2 and "in_memory: true needs one size (set in_memory: false)" in err, err


def test_top5_is_shown_only_where_it_can_be_below_100_percent() -> None:
    import torch

    from densenet.cli.eval import _report_lines
    from densenet.evaluation import EvalResult
    from densenet.train.epoch import epoch_line

    row = dict(epoch=1, train_loss=1.0, train_top1=50.0, val_loss=1.0, val_top1=60.0, val_top5=100.0, lr=0.1, img_per_s=10.0, time_s=1.0)  # fmt: skip
    assert "top5" not in epoch_line(row, 2, top5=False) and "top5 100.00%" in epoch_line(row, 2)
    for classes, shown in ((3, False), (5, False), (6, True), (10, True)):
        names = [f"c{i}" for i in range(classes)]
        result = EvalResult(60.0, 100.0, 1.0, 4, torch.eye(classes, dtype=torch.long), names)
        assert ("top-5" in "\n".join(_report_lines(result, "t"))) == shown


def test_out_of_memory_is_one_line_with_what_to_change_and_the_run_can_start_again(
    tmp_path, capsys, monkeypatch
):
    import densenet.train.loop

    def out_of_memory(*args):  # the CPU allocator's words, as torch raises them
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 2999994000003 bytes. Error code 12"
        )

    data = add_split(tmp_path / "d", "train", 10)
    add_split(tmp_path / "d", "val", 2)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(densenet.train.loop, "train_one_epoch", out_of_memory)
        status, _, err = run(train_args(data, out), capsys)
    assert status == 2 and "Traceback" not in err
    assert "error: out of memory (" in err and "2999994000003 bytes" in err
    assert "--batch-size" in err and "input_size" in err
    assert not out.exists()  # nothing trained: the same command can run again as it is
    status, _, err = run(train_args(data, out), capsys)
    assert status == 0, err

    def worker_killed(*args):  # what the DataLoader raises when the OOM killer took a worker
        raise RuntimeError("DataLoader worker (pid(s) 1713) exited unexpectedly")

    monkeypatch.setattr(densenet.train.loop, "train_one_epoch", worker_killed)
    status, _, err = run(train_args(data, tmp_path / "killed"), capsys)
    assert status == 2 and "Traceback" not in err
    assert "a data-loading worker died (DataLoader worker (pid(s) 1713) exited" in err
    assert "lack of memory" in err and "fewer --workers" in err

    def bug(*args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(densenet.train.loop, "train_one_epoch", bug)
    with pytest.raises(RuntimeError, match="shapes"):  # a bug keeps its traceback
        main(train_args(data, tmp_path / "other"))


def test_eval_names_the_split_it_scores_not_the_one_asked_for(trained, tmp_path, capsys):
    # train/ and test/ only: --split val reads test/, and says and records so.
    data = make_image_folder(tmp_path / "d", size=8, per_class=4)
    base = ["eval", "--checkpoint", str(trained["best"]), "--data-dir", str(data), "--json"]
    status, out, err = run([*base, "--split", "val"], capsys)
    assert status == 0, err
    assert "has no val/ sub-folder: evaluating test/" in err
    assert json.loads(out)["split"] == "test"
    # train/ only: "test" is the part held out for validation, which picked the best checkpoint.
    only_train = add_split(tmp_path / "t", "train", 10)
    base = ["eval", "--checkpoint", str(trained["best"]), "--data-dir", str(only_train), "--json"]
    status, out, err = run([*base, "--split", "test"], capsys)
    assert status == 0, err
    assert "--split test scores the part held out for validation" in err
    assert "a training run on it would validate on" in err  # not this model's: it never saw it
    assert json.loads(out)["split"] == "val" and json.loads(out)["images"] == 2


def test_int8_predict_skips_bad_images_in_its_calibration_too(trained, tmp_path, capsys):
    images = add_split(tmp_path, "imgs", 3) / "imgs"
    (images / "c0" / "broken.jpg").write_bytes(b"not a jpeg")
    base = ["predict", "--checkpoint", str(trained["best"]), str(images), "--precision", "int8"]
    status, _, err = run(base, capsys)
    assert status == 2 and "broken.jpg is not a readable image" in err
    status, out, err = run([*base, "--skip-bad-images", "--json"], capsys)
    assert status == 0, err
    assert "skipped" in err and "broken.jpg" in err
    report = json.loads(out)
    assert len(report["predictions"]) == 6  # 2 classes x 3, every readable image
    assert [s["file"] for s in report["skipped"]] == [str(images / "c0" / "broken.jpg")]


def half_trained_run(tmp_path: Path, capsys) -> tuple[Path, Path]:
    """(data, run): a folder of train/ and val/, and epoch 1 of a 2-epoch run on it."""
    data = add_split(tmp_path / "d", "train", 6)
    add_split(tmp_path / "d", "val", 2)
    out = tmp_path / "run"
    status, _, err = run(train_args(data, out, "--set", "schedule_epochs=2"), capsys)
    assert status == 0, err
    return data, out


def test_resume_on_data_with_other_classes_names_the_classes(tmp_path, capsys):
    data, out = half_trained_run(tmp_path, capsys)
    other = add_split(tmp_path / "o", "train", 6, ("c0", "c1", "c2"))
    add_split(tmp_path / "o", "val", 2, ("c0", "c1", "c2"))
    resume = ["train", "--resume", str(out), "--epochs", "2", "--no-progress"]
    status, _, err = run([*resume, "--data-dir", str(other)], capsys)
    assert status == 2 and "Traceback" not in err
    assert "its data now has 3 classes, the run trained on 2 (new: c2)" in err
    status, _, err = run(resume, capsys)  # its own data: it continues
    assert status == 0, err


def test_a_folder_changed_since_training_is_never_validated_or_scored_as_the_same(tmp_path, capsys):
    flat = add_split(tmp_path / "d", "flat", 20) / "flat"  # held out: 2 of each class
    out = tmp_path / "run"
    status, _, err = run(train_args(flat, out, "--set", "schedule_epochs=2"), capsys)
    assert status == 0, err
    evaluate = ["eval", "--checkpoint", str(out / "checkpoints" / "last.safetensors"), "--json"]
    status, printed, err = run(evaluate, capsys)
    assert status == 0 and "has changed since" not in err, err
    status, printed, err = run([*evaluate, "--split", "test"], capsys)
    assert "training picked its best checkpoint on it: a validation score" in err
    assert json.loads(printed)["split"] == "val"
    # A copy elsewhere is the same folder (its held-out part is the recorded one).
    copied = shutil.copytree(flat, tmp_path / "copy")
    status, printed, err = run([*evaluate, "--data-dir", str(copied)], capsys)
    assert status == 0 and "the model was trained on it: evaluating the part" in err, err
    assert json.loads(printed)["split"] == "val" and json.loads(printed)["images"] == 4
    # One held-out image of c0 removed: another file of c0 takes its place in the held-out part.
    from densenet import data

    held_out = [m for m, _ in data.build_dataset("folder", flat, "val").samples]
    Path(next(m for m in held_out if Path(m).parent.name == "c0")).unlink()
    status, printed, err = run(evaluate, capsys)
    assert status == 0, err
    assert "has changed since the model was trained" in err and "may hold images it trained" in err
    resume = ["train", "--resume", str(out), "--epochs", "2", "--no-progress"]
    status, _, err = run(resume, capsys)
    assert status == 2 and "its folder's files changed since training began" in err


def test_a_mistyped_split_is_one_line_naming_the_splits(trained, three_splits, capsys):
    evaluate = ["eval", "--checkpoint", str(trained["best"]), "--data-dir", str(three_splits)]
    status, _, err = run([*evaluate, "--split", "validation"], capsys)
    assert status == 2 and "Traceback" not in err
    assert "no split 'validation'; choose one of train, val, test, all" in err
    status, _, err = run([*evaluate, "--split", "tset"], capsys)
    assert status == 2 and "choose one of train, val, test, all; did you mean test?" in err


def test_resume_after_the_val_folder_is_gone_is_refused(tmp_path, capsys):
    data, out = half_trained_run(tmp_path, capsys)
    shutil.rmtree(data / "val")  # it would now validate on 10% of its training images
    status, _, err = run(["train", "--resume", str(out), "--epochs", "2", "--no-progress"], capsys)
    assert status == 2 and "it validated on its folder's own val/ or test/, which is gone" in err


def test_a_batch_larger_than_the_training_images_names_the_flag(tmp_path, capsys):
    data = add_split(tmp_path / "d", "train", 3)  # 2 classes x 3 images
    add_split(tmp_path / "d", "val", 1)
    status, _, err = run([*train_args(data, tmp_path / "r"), "--batch-size", "16"], capsys)
    assert status == 2 and "batch_size 16 is larger than the 6 training images" in err
    assert "give a smaller --batch-size (at most 6)" in err


def test_a_fine_tuned_run_resumes_after_its_starting_weights_moved(tmp_path, capsys):
    data, first = half_trained_run(tmp_path, capsys)
    tuned = tmp_path / "tuned"
    start = str(first / "checkpoints" / "best.safetensors")
    status, _, err = run(train_args(data, tuned, "--pretrained", start, "--set", "schedule_epochs=2"), capsys)  # fmt: skip
    assert status == 0, err
    shutil.move(first, tmp_path / "elsewhere")  # the checkpoint of `tuned` holds every weight
    status, _, err = run(
        ["train", "--resume", str(tuned), "--epochs", "2", "--no-progress"], capsys
    )
    assert status == 0, err


def test_eval_on_other_data_keeps_the_results_on_the_runs_own(trained, tmp_path, capsys):
    evaluate = ["eval", "--checkpoint", str(trained["best"]), "--json"]
    status, own, err = run(evaluate, capsys)  # the run's own data: test/
    assert status == 0, err
    other = make_image_folder(tmp_path / "other.data", size=8, per_class=2)
    status, printed, err = run([*evaluate, "--data-dir", str(other)], capsys)
    assert status == 0, err
    folder = trained["best"].parent
    assert json.loads(printed)["confusion_png"] == str(folder / "eval_folder-other_data_test.png")
    kept = json.loads((folder / "eval_folder_test.json").read_text())
    assert kept["images"] == json.loads(own)["images"] == 32  # not overwritten by the other data


def test_eval_names_a_built_in_dataset_with_other_classes(tmp_path: Path, capsys) -> None:
    """A Fashion-MNIST model scored on MNIST (scored by position) is named as such; on
    Fashion-MNIST itself nothing is said."""
    from densenet.data import dataset_info

    fashion = list(dataset_info("fashion_mnist").class_names)
    model = tiny_model(in_chans=1)
    checkpoint = save_checkpoint(
        tmp_path / "fm.safetensors", model, class_names=fashion, dataset="fashion_mnist",
        mean=[0.286], std=[0.353], input_size=[1, 28, 28],
    )  # fmt: skip
    base = ["eval", "--checkpoint", str(checkpoint), "--limit", "20", "--workers", "0", "--json"]
    for dataset, other in (("mnist", True), ("fashion_mnist", False)):
        data_dir = shared_data(dataset.replace("_", "-"))
        assert main([*base, "--dataset", dataset, "--data-dir", str(data_dir)]) == 0
        err = capsys.readouterr().err
        assert ("the model's classes are not mnist's (10 of 10 differ" in err) == other, err
        assert ("output 0: model 'T-shirt/top', mnist '0'" in err) == other, err
