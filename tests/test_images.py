"""Image files as users bring them: every PIL mode, EXIF orientation, out-of-range pixels and
decompression bombs, decoded by the one rule (``densenet.data.to_channels``) in training,
evaluation, prediction and visualization alike.

Fixtures are real files written in each mode (PNG 16-bit, TIFF float, CMYK JPEG, palette PNG with
tRNS, JPEG with an EXIF orientation tag, ...) plus the real samples in ../shared/data. Expected
pixels are worked out by hand from the documented rule, not by calling it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from inference_helpers import SHARED_DATA, save_checkpoint, shared_data, tiny_model
from PIL import Image

from densenet import data
from densenet.catalog import IMAGENET_MEAN, IMAGENET_STD
from densenet.cli import main
from densenet.config import TrainConfig
from densenet.data import eval_transform, load_image
from densenet.models import DenseNet
from densenet.train.inputs import build_data

SIDE = 32
COLUMNS = np.arange(SIDE)[None, :].repeat(SIDE, 0)  # x of each pixel, (H, W)
ROWS = COLUMNS.T  # y of each pixel
WHITE = 255
ORIENTATION = 0x0112  # the EXIF tag; 6 = "rotate 90 degrees clockwise to display"


def _rgb(r, g, b) -> np.ndarray:
    return np.stack(np.broadcast_arrays(r, g, b, COLUMNS)[:3], axis=-1).astype(np.uint8)


def _gray(values) -> np.ndarray:
    values = np.broadcast_to(values, (SIDE, SIDE)).astype(np.uint8)
    return _rgb(values, values, values)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


COLOR = _rgb(COLUMNS * 8, ROWS * 8, 128)  # an asymmetric picture: red across, green down
PALETTE = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (768 - 9)  # 0 red, 1 green, 2 blue
THIRDS = np.minimum(COLUMNS // 11, 2)  # palette index 0, 1, 2 from left to right
ALPHA = np.where(COLUMNS < 12, 0, np.where(COLUMNS < 20, 128, 255)).astype(np.uint8)


def _blend(value, alpha):
    """``value`` composited onto white at ``alpha`` (0-255): the rule's background."""
    opacity = np.asarray(alpha, np.float64) / 255
    return np.floor(np.asarray(value, np.float64) * opacity + WHITE * (1 - opacity) + 0.5)


def _palette(indices: np.ndarray) -> Image.Image:
    image = Image.fromarray(indices.astype(np.uint8), "L").convert("P")
    image.putpalette(PALETTE)
    return image


def _write_mode_files(folder: Path) -> dict[str, tuple[np.ndarray, int]]:
    """Write one real file per mode into ``folder``; ``{file name: (expected RGB, tolerance)}``.

    Tolerance is in 8-bit steps: 0 for lossless files and exact rules, 1 where PIL rounds a
    half-transparent blend, a few for lossy JPEG.
    """
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, tuple[np.ndarray, int]] = {}

    def save(name, image, rgb, tolerance=0, **options):
        image.save(folder / name, **options)
        expected[name] = (rgb, tolerance)

    stripes = (COLUMNS // 4) % 2 == 1
    save("mode_1.png", Image.fromarray(stripes), _gray(np.where(stripes, 255, 0)))
    ramp = (COLUMNS * 8).astype(np.uint8)
    save("mode_L.png", Image.fromarray(ramp), _gray(ramp))
    # Gray PNG with a tRNS value: pixels of value 0 (the first column) are transparent.
    save("mode_L_trns.png", Image.fromarray(ramp), _gray(np.where(ramp == 0, WHITE, ramp)),
         transparency=0)  # fmt: skip
    la = Image.merge("LA", [Image.new("L", (SIDE, SIDE), 50), Image.fromarray(ALPHA)])
    save("mode_LA.png", la, _gray(_blend(50, ALPHA)), 1)
    colors = np.array(PALETTE[:9]).reshape(3, 3)[THIRDS]
    save("mode_P.png", _palette(THIRDS), colors.astype(np.uint8))
    # Palette PNG whose tRNS makes entry 0 (the red left third) fully transparent.
    on_white = np.where((THIRDS == 0)[..., None], WHITE, colors).astype(np.uint8)
    save("mode_P_trns.png", _palette(THIRDS), on_white, transparency=0)
    pa = _palette(THIRDS).convert("PA")
    pa.putalpha(Image.fromarray(ALPHA))
    save("mode_PA.tif", pa, _blend(colors, ALPHA[..., None]).astype(np.uint8), 1)
    save("mode_RGB.png", Image.fromarray(COLOR), COLOR)
    rgba = np.dstack([_rgb(10, 200, 30), ALPHA])  # green, invisible on the left
    save("mode_RGBA.png", Image.fromarray(rgba), _blend(_rgb(10, 200, 30), ALPHA[..., None]), 1)
    # RGB PNG with a tRNS color key: (1, 2, 3) is transparent.
    keyed = COLOR.copy()
    keyed[:8, :8] = (1, 2, 3)
    on_white = COLOR.copy()
    on_white[:8, :8] = WHITE
    save("mode_RGB_trns.png", Image.fromarray(keyed), on_white, transparency=(1, 2, 3))
    # CMYK quadrants whose RGB is the same under any of PIL's CMYK formulas.
    cmyk = np.zeros((SIDE, SIDE, 4), np.uint8)
    cmyk[:16, :16] = (255, 0, 0, 0)  # cyan
    cmyk[:16, 16:] = (0, 0, 0, 255)  # black
    cmyk[16:, 16:] = (0, 255, 0, 0)  # magenta; bottom left stays white
    cmyk_rgb = np.full((SIDE, SIDE, 3), WHITE, np.uint8)
    cmyk_rgb[:16, :16] = (0, 255, 255)
    cmyk_rgb[:16, 16:] = (0, 0, 0)
    cmyk_rgb[16:, 16:] = (255, 0, 255)
    save("mode_CMYK.jpg", Image.fromarray(cmyk, "CMYK"), cmyk_rgb, 4, quality=95)
    save("mode_CMYK.tif", Image.fromarray(cmyk, "CMYK"), cmyk_rgb)
    # 16-bit and 32-bit integer gray: [0, 65535] scales to [0, 255] as round(v / 257).
    deep = (COLUMNS * 2114).astype(np.uint16)  # 0 ... 65534
    deep_8bit = np.floor(deep / 257 + 0.5)
    save("mode_I16.png", Image.fromarray(deep), _gray(deep_8bit))  # PIL mode "I;16"
    save("mode_I.tif", Image.fromarray(deep.astype(np.int32)), _gray(deep_8bit))  # mode "I"
    # Float gray in [0, 1]: round(255 v).
    unit = (COLUMNS / (SIDE - 1)).astype(np.float32)
    save("mode_F.tif", Image.fromarray(unit), _gray(np.floor(unit * 255 + 0.5)))
    ycbcr = Image.fromarray(COLOR).convert("YCbCr")
    save("mode_YCbCr.tif", ycbcr, np.asarray(ycbcr.convert("RGB")))
    # EXIF orientation 6: stored on its side; shown (and expected) turned 90 degrees clockwise.
    upright = np.rot90(COLOR, k=-1)
    save("exif_rotated.png", Image.fromarray(COLOR), upright, exif=_exif(6))
    save("exif_rotated.jpg", Image.fromarray(COLOR), upright, 8, exif=_exif(6), quality=95)
    return expected


def _file_modes(folder: Path) -> dict[str, str]:
    return {p.name: Image.open(p).mode for p in sorted(folder.iterdir())}


def test_the_fixture_files_really_are_in_each_mode(tmp_path):
    modes = _file_modes(_write_folder(tmp_path)[0] / "images")
    assert set(modes.values()) >= {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16",
                                   "I", "F", "YCbCr"}  # fmt: skip
    assert modes["mode_P_trns.png"] == "P" and modes["mode_I16.png"] == "I;16"
    assert Image.open(tmp_path / "images" / "images" / "exif_rotated.jpg").getexif()[ORIENTATION]


def _write_folder(tmp_path: Path) -> tuple[Path, dict]:
    """``tmp_path/images/images/<file>``: a flat folder dataset of one class."""
    root = tmp_path / "images"
    return root, _write_mode_files(root / "images")


def _as_uint8(tensor: torch.Tensor) -> np.ndarray:
    """A transform's ``(C, H, W)`` float in [0, 1] (mean 0, std 1) as ``(H, W, C)`` uint8."""
    return (tensor * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _expected(rgb: np.ndarray, channels: int) -> np.ndarray:
    if channels == 3:
        return rgb
    return np.asarray(Image.fromarray(np.asarray(rgb, np.uint8)).convert("L"))[..., None]


@pytest.mark.parametrize("channels", [3, 1])
def test_every_mode_decodes_by_the_documented_rule_in_every_path(tmp_path, channels):
    root, expected = _write_folder(tmp_path)
    plain = eval_transform(SIDE, (0.0,) * channels, (1.0,) * channels, crop_pct=1.0)
    folder = data.FolderImages(root, transform=plain)
    in_memory = folder.to_memory(channels)  # how training holds small images
    problems = []
    for i, (member, _) in enumerate(folder.samples):
        name = Path(member).name
        want = _expected(expected[name][0], channels).astype(int)
        paths = {
            "predict/visualize": _as_uint8(plain(load_image(member))),
            "eval/training per image": _as_uint8(folder[i][0]),
            "training in memory": in_memory.images[i].permute(1, 2, 0).numpy(),
        }
        for path, got in paths.items():
            error = int(np.abs(got.astype(int) - want).max())
            if error > expected[name][1]:
                problems.append(f"{name} via {path}: off by up to {error}")
    assert not problems, "\n".join(problems)


def test_exif_orientation_is_applied(tmp_path):
    root, _ = _write_folder(tmp_path)
    tall = Image.fromarray(np.zeros((10, 20, 3), np.uint8))  # stored 20 wide, 10 high
    tall.save(root / "images" / "landscape_stored.jpg", exif=_exif(6))
    assert load_image(root / "images" / "landscape_stored.jpg").size == (10, 20)  # shown upright
    folder = data.FolderImages(root)
    index = [Path(m).name for m, _ in folder.samples].index("landscape_stored.jpg")
    assert folder[index][0].size == (10, 20)


def _bad_file(folder: Path, name: str, image: Image.Image) -> Path:
    image.save(folder / name)
    return folder / name


@pytest.mark.parametrize(
    ("name", "image", "message"),
    [
        ("float_0_255.tif", Image.fromarray((COLUMNS * 8).astype(np.float32)),
         "floating-point image with values from 0 to 248; float images must hold 0 to 1"),
        ("float_nan.tif", Image.fromarray(np.full((4, 4), np.nan, np.float32)),
         "floating-point image holds NaN or infinite values"),
        ("negative.tif", Image.fromarray(np.full((4, 4), -5, np.int32)),
         "integer image (mode I) with values from -5 to -5; integer images are read as 16-bit"),
    ],
)  # fmt: skip
def test_nonsense_pixel_ranges_are_one_line_errors_naming_the_file(tmp_path, name, image, message):
    path = _bad_file(tmp_path, name, image)
    with pytest.raises(ValueError) as error:
        load_image(path)
    assert str(error.value).startswith(f"{path}: {message}")
    assert "\n" not in str(error.value)


# --- decompression bombs ------------------------------------------------------------------------
LIMIT = 1500  # pixels; the mode files have 32 x 32 = 1024


def _bombs(folder: Path) -> list[Path]:
    """Two images over a ``LIMIT`` bomb limit: one just over it (PIL alone only warns), one over
    twice it (PIL raises DecompressionBombError)."""
    folder.mkdir(parents=True, exist_ok=True)
    just_over = _bad_file(folder, "just_over.png", Image.new("RGB", (40, 40)))  # 1600 pixels
    far_over = _bad_file(folder, "far_over.png", Image.new("RGB", (64, 64)))  # 4096 pixels
    return [just_over, far_over]


def test_images_over_the_bomb_limit_are_one_line_errors_or_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", LIMIT)
    root, _ = _write_folder(tmp_path)
    bombs = _bombs(root / "images")
    for bomb in bombs:
        with pytest.raises(data.BadImageError) as error:
            load_image(bomb)
        message = str(error.value)
        assert message.startswith(f"{bomb}: ") and "\n" not in message
        assert (
            "over PIL's decompression-bomb limit of 1,500 (PIL.Image.MAX_IMAGE_PIXELS)" in message
        )
    folder = data.build_dataset("folder", root, "all")
    index = [m for m, _ in folder.samples].index(str(bombs[0]))
    with pytest.raises(ValueError, match="just_over.png: 1,600 pixels, over .*--skip-bad-images"):
        folder[index]
    skipping = data.build_dataset("folder", root, "all", skip_bad_images=True)
    assert skipping.skipped == 2 and len(skipping) == len(folder) - 2
    assert [problem.split(":")[0] for problem in skipping.bad_images] == [str(b) for b in
                                                                          sorted(bombs)]  # fmt: skip


def test_the_environment_raises_the_bomb_limit_for_trusted_images(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", LIMIT)
    root, _ = _write_folder(tmp_path)
    bomb = _bombs(root / "images")[0]
    with pytest.raises(data.BadImageError, match="raise the limit: DENSENET_MAX_IMAGE_PIXELS=N"):
        load_image(bomb)
    monkeypatch.setenv("DENSENET_MAX_IMAGE_PIXELS", str(100 * LIMIT))
    assert load_image(bomb).size[0] > 0
    monkeypatch.setenv("DENSENET_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="'lots' is not a number of pixels"):
        load_image(bomb)


def test_training_skips_bombs_with_skip_bad_images(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", LIMIT)
    root, _ = _write_folder(tmp_path)
    _bombs(root / "images")
    cfg = TrainConfig(dataset="folder", data_dir=str(root), batch_size=2, train_subset=None,
                      workers=0, skip_bad_images=True)  # fmt: skip
    assert build_data(cfg, torch.device("cpu")).skipped_images == 2
    cfg.skip_bad_images = False
    with pytest.raises(ValueError, match="decompression-bomb limit"):
        build_data(cfg, torch.device("cpu"))


def _checkpoint(path: Path, classes: list[str]) -> Path:
    """A checkpoint as densenet train writes it for a folder dataset (ImageNet statistics)."""
    model = tiny_model(num_classes=len(classes))
    return save_checkpoint(
        path, model, class_names=classes, mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD), dataset="folder", input_size=[3, SIDE, SIDE],
    )  # fmt: skip


def test_predict_and_eval_commands_report_a_bomb_in_one_line_or_skip_it(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", LIMIT)
    root, expected = _write_folder(tmp_path)
    bombs = _bombs(root / "images")
    checkpoint = str(_checkpoint(tmp_path / "ck.safetensors", ["images"]))
    predict = ["predict", str(root), "--checkpoint", checkpoint, "--device", "cpu", "--json"]
    assert main(predict) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "far_over.png: 4,096 pixels, over PIL's" in err
    assert err.rstrip().endswith("remove it or pass --skip-bad-images")
    assert main([*predict, "--skip-bad-images"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert sorted(Path(p["file"]).name for p in result["predictions"]) == sorted(expected)
    assert sorted(s["file"] for s in result["skipped"]) == sorted(str(b) for b in bombs)
    assert f"skipped {bombs[0]}: 1,600 pixels, over" in err and "skipped 2 of" in err
    evaluate = ["eval", "--checkpoint", checkpoint, "--data-dir", str(root), "--workers", "0"]
    evaluate += ["--device", "cpu", "--json", "--out", str(tmp_path / "eval")]
    assert main(evaluate) == 2
    err = capsys.readouterr().err
    assert "decompression-bomb limit" in err and err.count("densenet eval: error") == 1
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert main([*evaluate, "--skip-bad-images"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["images"] == len(expected)
    assert f"skipped {bombs[1]}: 4,096 pixels" in err


# --- one decoding for every path ----------------------------------------------------------------
VISUALIZED = ("exif_rotated.jpg", "mode_F.tif", "mode_I16.png", "mode_P_trns.png", "mode_RGBA.png")


class ModelInputs:
    """Records every batch a DenseNet's forward receives, per image, for the duration of a test."""

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []

    def __call__(self, module, args):
        if isinstance(module, DenseNet):
            self.images += list(args[0].detach().clone())

    def take(self) -> list[torch.Tensor]:
        taken, self.images = self.images, []
        return taken


def _real_samples(folder: Path, same_size: bool) -> None:
    """Real images from ../shared/data/test-samples: CIFAR-10 PNGs (32 x 32 RGB), and unless
    ``same_size``, MNIST PNGs (28 x 28 gray) and ImageNet JPEGs (various sizes)."""
    samples = shared_data("test-samples")
    names = sorted(samples.glob("cifar10_0*.png"))[:4]
    if not same_size:
        names += (
            sorted(samples.glob("mnist_0*.png"))[:2] + sorted(samples.glob("imagenet_*.jpg"))[:2]
        )
    for path in names:
        shutil.copy(path, folder / path.name)


@pytest.mark.parametrize(
    "in_memory",
    [
        pytest.param(True, id="in-memory"),
        pytest.param(False, id="per-image", marks=pytest.mark.slow),
    ],
)
def test_same_file_same_tensor_in_training_eval_predict_and_visualize(
    tmp_path, monkeypatch, capsys, in_memory
):
    files = tmp_path / "files"
    _write_mode_files(files)
    _real_samples(files, same_size=in_memory)
    names = sorted(p.name for p in files.iterdir())
    root = tmp_path / "data"
    for split in ("train", "test"):  # the same files in both splits, one class
        shutil.copytree(files, root / split / "images")
    checkpoint = str(_checkpoint(tmp_path / "ck.safetensors", ["images"]))
    # A figure per image is slow: visualize the modes that convert the most, and one real photo.
    names_visualized = [n for n in names if n in VISUALIZED] + [
        n for n in names if n.startswith("cifar10")
    ][:1]
    inputs = ModelInputs()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(inputs)
    try:
        # Training: the validation loader is ordered; the training loader shuffles.
        cfg = TrainConfig(
            dataset="folder", data_dir=str(root), batch_size=1, train_subset=None, workers=0,
            in_memory=in_memory, input_size=SIDE,
        )  # fmt: skip
        d = build_data(cfg, torch.device("cpu"))
        assert isinstance(d.val_loader.dataset, data.InMemoryImages) == in_memory
        trained = []
        for images, _ in d.val_loader:
            trained += list(d.val_transform(images) if d.val_transform else images)
        shuffled = [
            x for images, _ in d.train_loader
            for x in (d.train_transform(images) if d.train_transform else images)
        ]  # fmt: skip
        common = ["--checkpoint", checkpoint, "--device", "cpu"]
        out = str(tmp_path / "out")
        assert main(["eval", *common, "--data-dir", str(root), "--workers", "0", "--out", out]) == 0
        evaluated = inputs.take()
        assert main(["predict", str(root / "test"), *common, "--batch-size", "1"]) == 0
        predicted = inputs.take()
        visualized = []
        for name in names_visualized:
            image = str(root / "test" / "images" / name)
            assert main(["visualize", image, *common, "--out", out + "/v.png"]) == 0
            visualized += inputs.take()
    finally:
        hook.remove()
    capsys.readouterr()
    assert len(trained) == len(evaluated) == len(predicted) == len(names)
    for name, t, e, p in zip(names, trained, evaluated, predicted, strict=True):
        assert torch.equal(t, e), f"{name}: training and eval differ"
        assert torch.equal(t, p), f"{name}: training and predict differ"
    assert len(visualized) == len(VISUALIZED) + 1
    for name, v in zip(names_visualized, visualized, strict=True):
        assert torch.equal(trained[names.index(name)], v), f"{name}: training and visualize differ"
    # Every training image is one of those tensors too (in its own shuffled order).
    assert sorted(x.sum().item() for x in shuffled) == sorted(x.sum().item() for x in trained)


def test_real_sample_images_decode_as_their_modes_say():
    samples = SHARED_DATA / "test-samples"
    for pattern, mode in (
        ("mnist_*.png", "L"),
        ("cifar10_*.png", "RGB"),
        ("imagenet_*.jpg", "RGB"),
    ):
        paths = sorted(shared_data("test-samples").glob(pattern))
        assert paths, f"no {pattern} in {samples}"
        for path in paths:
            image = load_image(path)
            assert image.mode == mode, path
            assert np.array_equal(np.asarray(image), np.asarray(Image.open(path).convert(mode)))


def test_16_bit_image_of_12_bit_data_is_kept_dark_but_named_once(tmp_path, monkeypatch, capsys):
    """8- or 12-bit data stored in 16-bit files (mode I;16, values < 4096) keeps the 0-65535 rule,
    with one notice per file: the first 3 files by name, then a count at 10, 100, ..."""
    from densenet.data import images

    monkeypatch.setattr(images, "_dark_files", set())
    root = tmp_path / "xray"
    for c, cls in enumerate(("lung", "heart")):
        (root / cls).mkdir(parents=True)
        for n in range(6):
            twelve_bit = (COLUMNS * 130 + n + c).astype(np.uint16)  # up to 4030 + n + c
            Image.fromarray(twelve_bit).save(root / cls / f"{n}.png")
    deep = root / "lung" / "deep.png"
    Image.fromarray((COLUMNS * 2114).astype(np.uint16)).save(deep)  # real 16-bit: no notice
    first = root / "heart" / "0.png"
    assert Image.open(first).mode == "I;16"
    pixels = np.asarray(load_image(first))
    assert pixels.max() == round(4031 / 257) == 16  # the documented rule: nearly black
    load_image(first)  # the same file again (every epoch): no second notice
    dataset = data.build_dataset("folder", root, "all")
    for index in range(len(dataset)):
        dataset[index]
    notices = capsys.readouterr().err.splitlines()
    assert notices[:3] == [
        f"densenet: {path}: 16-bit image whose values stay below 4096 (max {high}): scaled as "
        "16-bit (0-65535), so it is dark; if it holds 8- or 12-bit data, rescale it to 0-65535 "
        "or save it as 8-bit"
        for path, high in ((first, 4031), (root / "heart" / "1.png", 4032),
                           (root / "heart" / "2.png", 4033))
    ]  # fmt: skip
    assert notices[3:] == [
        "densenet: 10 16-bit images so far with values below 4096, read dark "
        "(the first 3 are named above)"
    ]
    assert not any("deep.png" in line for line in notices)
