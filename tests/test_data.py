"""Datasets, transforms and loaders: real files where they exist, small synthetic ones otherwise."""

from __future__ import annotations

import gzip
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from densenet import data
from densenet.catalog import CIFAR10_CLASSES
from densenet.data import datasets

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_ZIP = SHARED / "cifar10-jpeg" / "cifar10_yoongikim_jpeg_q75.zip"


def make_image_folder(
    root: Path, size: int = 8, per_class: int = 3, classes: int = 2, fmt: str = "PNG"
) -> Path:
    """``root/{train,test}/c<i>/<n>.png`` of random RGB images; returns ``root``."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{n}.{fmt.lower()}", fmt)
    return root


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (expected ../shared/data beside the checkout)")


# --- MNIST-like IDX files ---------------------------------------------------------------------
def test_fashion_mnist_from_data_dir_real_files():
    _need(SHARED / "fashion-mnist")
    test = data.build_dataset("fashion_mnist", SHARED / "fashion-mnist", "test")
    assert isinstance(test, data.InMemoryImages)
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert sorted(test.targets.unique().tolist()) == list(range(10))
    assert torch.bincount(test.targets).tolist() == [1000] * 10
    # The first test image is an ankle boot (test-samples/fashionMNIST_00_9.png is the same image).
    assert int(test.targets[0]) == 9
    png = np.asarray(Image.open(SHARED / "test-samples" / "fashionMNIST_00_9.png").convert("L"))
    assert torch.equal(test.images[0, 0], torch.from_numpy(png.copy()))


def test_mnist_missing_says_which_files_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.build_dataset("mnist", tmp_path, "train")
    message = str(error.value)
    assert "train-images-idx3-ubyte.gz" in message and str(tmp_path) in message


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (10, 28, 28))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + b"\0" * 100))
    labels = (2049).to_bytes(4, "big") + (10).to_bytes(4, "big") + bytes(10)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    with pytest.raises(ValueError, match="truncated IDX"):
        data.build_dataset("mnist", tmp_path, "test")


# --- CIFAR (python pickles) -------------------------------------------------------------------
def _write_cifar10(root: Path, per_batch: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": list(range(per_batch)),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


def test_cifar10_python_format(tmp_path):
    folder = _write_cifar10(tmp_path)
    train = data.build_dataset("cifar10", tmp_path, "train")
    assert train.images.shape == (20, 3, 32, 32)
    first = pickle.loads((folder / "data_batch_1").read_bytes())["data"][0]
    assert torch.equal(train.images[0], torch.from_numpy(first.reshape(3, 32, 32)))
    assert data.build_dataset("cifar10", tmp_path, "test").targets.tolist() == [0, 1, 2, 3]


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # would create the file if unpickled


def test_cifar_pickle_with_code_is_refused(tmp_path):
    folder = _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps({"data": _Payload(str(marker)), "labels": []}))
    with pytest.raises(ValueError, match="refusing to load"):
        data.build_dataset("cifar10", tmp_path, "test")
    assert not marker.exists()


def test_cifar100_missing_names_the_archive(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        data.build_dataset("cifar100", tmp_path, "train")


# --- SVHN (.mat) ------------------------------------------------------------------------------
def test_svhn_train_plus_extra(tmp_path):
    savemat = pytest.importorskip("scipy.io").savemat
    for split, n in (("train", 3), ("extra", 2)):
        x = np.full((32, 32, 3, n), 7, dtype=np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": np.array([[10], [1], [2]][:n])})
    ds = data.build_dataset("svhn", tmp_path, "train+extra")
    assert ds.images.shape == (5, 3, 32, 32)
    assert ds.targets.tolist() == [0, 1, 2, 0, 1]  # SVHN's label 10 is the digit 0


# --- folders and zips -------------------------------------------------------------------------
def test_folder_dataset_and_transform(tmp_path):
    root = make_image_folder(tmp_path, size=12)
    transform = data.build_transforms("none", False, (0.5,) * 3, (0.5,) * 3, 8, crop_pct=1.0)
    ds = data.build_dataset("folder", root, "val", transform)  # 'val' falls back to test/
    assert ds.classes == ["c0", "c1"] and len(ds) == 6
    image, target = ds[0]
    assert image.shape == (3, 8, 8) and target == 0
    assert data.dataset_info("folder", root).num_classes == 2


def test_folder_inside_zip_reads_without_extracting(tmp_path):
    root = make_image_folder(tmp_path / "tree", fmt="JPEG")
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(root.rglob("*.jpeg")):
            z.write(f, f.relative_to(root).as_posix())
    ds = data.build_dataset("folder", archive, "train")
    assert ds.classes == ["c0", "c1"] and len(ds) == 6
    image, _ = ds[5]
    expected = Image.open(root / "train" / "c1" / "2.jpeg")
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    memory = ds.to_memory()
    assert memory.images.shape == (6, 3, 8, 8) and memory.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert not (tmp_path / "train").exists()


def test_zip_slip_member_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("train/cat/ok.png", b"x")
        z.writestr("../../escape/cat/evil.png", b"x")
    with pytest.raises(ValueError, match="unsafe path"):
        data.build_dataset("folder", archive, "train")


def test_bad_image_is_named_or_skipped(tmp_path):
    root = make_image_folder(tmp_path)
    (root / "train" / "c1" / "broken.png").write_bytes(b"not a png at all")
    ds = data.build_dataset("folder", root, "train")
    bad = [i for i, (m, _) in enumerate(ds.samples) if m.endswith("broken.png")][0]
    with pytest.raises(
        ValueError,
        match=r"broken\.png is not a readable image \(unknown or unsupported format\); remove it or pass --skip-bad-images$",
    ):
        ds[bad]
    skipping = data.build_dataset("folder", root, "train", skip_bad_images=True)
    assert skipping.skipped == 1 and len(skipping) == 6


def test_real_cifar10_jpeg_zip_layout():
    _need(CIFAR_ZIP)
    test = data.build_dataset("folder", CIFAR_ZIP, "test")
    assert test.classes == list(CIFAR10_CLASSES) and len(test) == 10000
    image, target = test[0]
    assert image.size == (32, 32) and target == 0


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="choose one of cifar10"):
        data.dataset_info("cifar11")
    with pytest.raises(ValueError, match="no split 'extra'"):
        data.build_dataset("mnist", None, "extra")


# --- transforms -------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", data.RECIPES)
def test_every_recipe_gives_normalized_tensors(recipe):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    torch.manual_seed(0)  # the random augmentations draw the same values in every run
    for train in (True, False):
        t = data.build_transforms(recipe, train, (0.5, 0.5, 0.5), (0.25,) * 3, 24, crop_pct=0.875)
        out = t(image)
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32
        # PCA lighting shifts colors either way: past 1 and below 0 (it drew -2.0075 once)
        assert out.min() >= -2.0 - 1.0 and out.max() <= 2.0 + 1.0


def test_eval_transform_resizes_then_center_crops():
    image = Image.new("L", (64, 64))
    image.paste(255, (24, 24, 40, 40))  # a white 16x16 square in the middle
    t = data.build_transforms("none", False, (0.0,), (1.0,), 16, crop_pct=0.5)
    out = t(image)  # resize to 32, crop 16: the square fills the center 8x8
    assert out.shape == (1, 16, 16)
    assert out[0, 6:10, 6:10].min() > 0.9 and out[0, :2].max() < 0.1


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-3)


def test_batch_transform_normalizes_and_crops_like_random_crop():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    plain = data.BatchTransform("none", True, (0.5,) * 3, (0.5,) * 3)(images)
    # Bit for bit what the per-image torchvision path gives, so both paths feed the same tensor.
    per_image = v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    )
    assert torch.equal(plain, per_image(images))
    torch.manual_seed(0)
    out = data.BatchTransform("standard", True, (0.0,) * 3, (1 / 255,) * 3, pad=4)(images)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images.float(), (4, 4, 4, 4))
    windows = [
        padded[:, :, y : y + 8, x : x + 8] for y in range(9) for x in range(9)
    ]  # every crop of the zero-padded image, flipped or not
    for i in range(len(images)):
        assert any(_close(out[i], w[i]) or _close(out[i], w[i].flip(-1)) for w in windows)
    assert not _close(out, images.float())  # something moved
    evaluation = data.BatchTransform("standard", False, (0.0,) * 3, (1 / 255,) * 3)
    assert _close(evaluation(images), images.float())


# --- loaders ----------------------------------------------------------------------------------
def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    a, b = data.EpochSampler(50, True, seed=3), data.EpochSampler(50, True, seed=3)
    b.set_epoch(1)
    first, second = list(a), list(b)
    assert sorted(first) == list(range(50)) and first != second
    a.set_epoch(1)
    assert list(a) == second
    a.set_epoch(1, start=10)
    assert list(a) == second[10:] and len(a) == 40
    shards = [data.EpochSampler(50, True, 3, num_replicas=3, rank=r) for r in range(3)]
    for shard in shards:
        shard.set_epoch(1)
    assert all(len(s) == len(list(s)) == 16 for s in shards)
    strided = [i for batch in zip(*shards, strict=True) for i in batch]
    assert strided == second[:48]


def test_eval_sampler_shares_cover_each_sample_once():
    shards = [list(data.EpochSampler(50, False, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shards] == [17, 17, 16]
    assert sorted(sum(shards, [])) == list(range(50))


def test_in_memory_loader_serves_whole_uint8_batches():
    ds = data.InMemoryImages(
        torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous(),
        torch.arange(10),
        [str(i) for i in range(10)],
    )
    loader = data.build_loader(ds, 4, train=True, workers=2, seed=0)
    data.set_epoch(loader, 0)
    batches = list(loader)
    assert len(batches) == 2  # drop_last while training
    images, targets = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (4, 1, 2, 2)
    assert torch.equal(images[:, 0, 0, 0].long(), targets)
    data.set_epoch(loader, 0, start_batch=1)
    assert torch.equal(next(iter(loader))[1], batches[1][1])
    evaluation = list(data.build_loader(ds, 4, train=False))
    assert [len(t) for _, t in evaluation] == [4, 4, 2]


def test_download_failure_offline_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(datasets.torchvision_datasets, "MNIST", offline)
    with pytest.raises(FileNotFoundError, match="downloading into .* failed .*unreachable"):
        data.build_dataset("mnist", tmp_path, "test", download=True)


def test_fashion_mnist_default_lookup_order(tmp_path, monkeypatch):
    _need(SHARED / "fashion-mnist")
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", (SHARED / "fashion-mnist",))
    monkeypatch.setattr(datasets, "DOWNLOAD_DIR", tmp_path / "cache")
    assert len(data.build_dataset("fashion_mnist", None, "test")) == 10000  # the system copy
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="mnist not found.*" + str(tmp_path / "empty")):
        data.build_dataset("mnist", tmp_path / "empty", "test")


@pytest.mark.parametrize("name", data.DATASETS)
def test_a_data_dir_that_does_not_exist_is_an_error_for_every_dataset(tmp_path, monkeypatch, name):
    _need(SHARED / "fashion-mnist")
    # A system-wide Fashion-MNIST is installed (as Debian's package does): no dataset may fall
    # back to it, or to anything else, when the --data-dir given is wrong.
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", (SHARED / "fashion-mnist",))
    missing = tmp_path / "no-such-dir"
    with pytest.raises(FileNotFoundError, match=f"--data-dir {missing} does not exist"):
        data.build_dataset(name, missing, "test")
    if name in ("folder", "cifar100", "csv"):  # their class names come from the folder
        with pytest.raises(FileNotFoundError, match=f"--data-dir {missing} does not exist"):
            data.dataset_info(name, missing)


def test_fashion_mnist_data_dir_without_its_files_is_an_error(tmp_path, monkeypatch):
    _need(SHARED / "fashion-mnist")
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", (SHARED / "fashion-mnist",))
    with pytest.raises(FileNotFoundError, match=f"fashion_mnist not found.*{tmp_path}"):
        data.build_dataset("fashion_mnist", tmp_path, "test")  # not the system copy


# --- MNIST vs Fashion-MNIST files: same names and shapes, told apart by published MD5 ----------
@pytest.mark.parametrize(
    "asked, folder, holds, instead",
    [
        ("fashion_mnist", "mnist", "MNIST", "mnist"),
        ("mnist", "fashion-mnist", "Fashion-MNIST", "fashion_mnist"),
    ],
)
@pytest.mark.parametrize("split", ["test", "train"])
def test_the_other_mnist_likes_files_are_refused(asked, folder, holds, instead, split):
    _need(SHARED / folder)
    with pytest.raises(ValueError) as error:
        data.build_dataset(asked, SHARED / folder, split)
    message = str(error.value)
    assert f"--data-dir {SHARED / folder} holds {holds}'s files" in message
    assert "matches its published MD5" in message and "\n" not in message
    assert f"use --dataset {instead} or the" in message


@pytest.mark.parametrize("name, folder", [("mnist", "mnist"), ("fashion_mnist", "fashion-mnist")])
def test_each_mnist_like_folder_loads_as_itself(name, folder):
    _need(SHARED / folder)
    assert len(data.build_dataset(name, SHARED / folder, "test")) == 10000


@pytest.mark.parametrize("compress", [gzip.compress, lambda raw: raw], ids=["gz", "raw"])
def test_an_unknown_copy_of_the_other_datasets_files_still_loads(tmp_path, compress):
    """Decompressed or re-compressed files match no published MD5: read as asked, no false alarm."""
    source = SHARED / "fashion-mnist"
    _need(source)
    suffix = ".gz" if compress is gzip.compress else ""
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        raw = gzip.decompress((source / f"{stem}.gz").read_bytes())
        (tmp_path / (stem + suffix)).write_bytes(compress(raw))
    assert len(data.build_dataset("mnist", tmp_path, "test")) == 10000


def test_small_idx_files_of_neither_dataset_load(tmp_path):
    images = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (3, 28, 28))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(images + bytes(3 * 784)))
    labels = (2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    for name in ("mnist", "fashion_mnist"):
        assert data.build_dataset(name, tmp_path, "test").targets.tolist() == [1, 2, 3]
