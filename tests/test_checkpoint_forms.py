"""Every real form a DenseNet weights file comes in, made the way its publisher makes it.

Each fixture reproduces a published or commonly written file's exact key set, dtypes and container
(not ``model.state_dict()`` saved back): torchvision's published files (pre-0.4 ``norm.1`` keys, no
``num_batches_tracked``, legacy ``torch.save``), timm's Hugging Face safetensors and its train
script's checkpoints, DataParallel/DDP, Lightning and torch.compile prefixes, nested and EMA
entries, fp16/bf16 files and a third-party CIFAR layout (:data:`densenet.hub.formats.KEY_LAYOUTS`).
Then property-based tests (hypothesis): every file ``save_weights`` / ``save_state`` writes reads
back whatever its metadata size, and the file-kind sniffer never takes one kind for another.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from inference_helpers import shared_data
from PIL import Image
from safetensors.torch import save_file

import densenet
from densenet import DenseNet
from densenet.cli import main
from densenet.io import CheckpointError, file_kind, load_state, read_header, save_state

TINY = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5)
COUNTER = "num_batches_tracked"
TV_LEGACY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.")


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with random BN statistics and affine terms (fresh ones hide a misplaced buffer)."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
            m.num_batches_tracked.fill_(1234)  # a trained model's counter; files may not carry it
    return model.eval()


def tiny() -> DenseNet:
    torch.manual_seed(0)
    return randomized(DenseNet(**TINY))


def outputs(model: torch.nn.Module, size: int = 32) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k].to(a[k].dtype))]
    assert not different, different[:5]


# --- torchvision's published files --------------------------------------------------------------


def torchvision_published_file(path: Path, arch: str = "densenet121") -> Path:
    """torchvision's published ``arch`` file (e.g. densenet121-a639ec97.pth) in its real form.

    Published in 2017 (PyTorch 0.2/0.3): an OrderedDict with the old module names
    (``denselayer1.norm.1.weight``; vision PR #474 renamed them), no BatchNorm
    ``num_batches_tracked`` (added in PyTorch 0.4.1), float32, legacy (pickle, not zip)
    ``torch.save`` serialization, no ``_metadata`` attribute. Values: torchvision's own
    constructor, BN statistics randomized.
    """
    torch.manual_seed(0)
    model = randomized(getattr(torchvision.models, arch)())
    state = OrderedDict(
        (TV_LEGACY.sub(r"\1.\2.", k), v)
        for k, v in model.state_dict().items()
        if not k.endswith(COUNTER)
    )
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return path


class PublishedWeights:
    """The part of torchvision's ``WeightsEnum`` its loader calls; ``torch.hub`` reads a
    download with ``torch.load(weights_only=True)``, as here."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def get_state_dict(self, progress: bool = True, check_hash: bool = False) -> dict:
        return torch.load(self.path, map_location="cpu", weights_only=True)


def test_torchvision_published_file_loads_as_torchvision_loads_it(tmp_path: Path, capsys) -> None:
    """Failed before: '... the weights do not fit the architecture (121 missing:
    features.norm0.num_batches_tracked, ...)'."""
    path = torchvision_published_file(tmp_path / "densenet121-a639ec97.pth")
    raw = torch.load(path, weights_only=True)
    assert path.read_bytes()[:2] == b"\x80\x02" and not zipfile.is_zipfile(path)
    assert "features.denseblock1.denselayer1.norm.1.weight" in raw
    assert not any(k.endswith(COUNTER) for k in raw)
    assert {v.dtype for v in raw.values()} == {torch.float32}

    theirs = torchvision.models.densenet121()
    torchvision.models.densenet._load_state_dict(theirs, PublishedWeights(path), progress=False)
    ours = densenet.create_model("densenet121", pretrained=path)
    assert_same_state(theirs.state_dict(), ours.state_dict())
    counters = [v for k, v in ours.state_dict().items() if k.endswith(COUNTER)]
    assert len(counters) == 121 and all(int(c) == 0 for c in counters)
    assert len(raw) == len(theirs.state_dict()) - len(counters)
    expected = outputs(theirs, 64)
    assert (outputs(ours, 64) - expected).abs().max() / expected.abs().max() < 1e-6
    # and through the command line, as a user brings it
    image = tmp_path / "photo.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    capsys.readouterr()
    argv = ["predict", "--model", "densenet121", "--pretrained", str(path), str(image), "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    top = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    assert len(top) == 5 and 0 < sum(t["probability"] for t in top) <= 1


# --- timm -------------------------------------------------------------------------------------


@pytest.mark.parametrize("counters", [True, False])
def test_timm_hub_safetensors_file(tmp_path: Path, counters: bool) -> None:
    """timm's Hugging Face files (densenet121.ra_in1k/model.safetensors): timm's module names,
    float32, safetensors with ``{"format": "pt"}`` metadata; with and without BN counters."""
    torch.manual_seed(0)
    theirs = randomized(timm.create_model("densenet121", pretrained=False))
    state = {k: v for k, v in theirs.state_dict().items() if counters or not k.endswith(COUNTER)}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    assert file_kind(path) == "safetensors"
    ours = densenet.create_model("densenet121", pretrained=path)
    expected = 1234 if counters else 0
    assert all(int(v) == expected for k, v in ours.state_dict().items() if k.endswith(COUNTER))
    relative = (outputs(ours, 64) - outputs(theirs, 64)).abs().max() / outputs(
        theirs, 64
    ).abs().max()
    assert relative < 1e-6


def timm_train_checkpoint(model: torch.nn.Module, ema: torch.nn.Module | None) -> dict:
    """What timm's train.py writes (``CheckpointSaver``): ``checkpoint-N.pth.tar``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = {
        "epoch": 3, "arch": "densenet121", "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(), "version": 2,
        "args": argparse.Namespace(model="densenet121", lr=0.1, sched="cosine", betas=None),
        "metric": 12.5,
    }  # fmt: skip
    if ema is not None:
        state["state_dict_ema"] = ema.state_dict()
    return state


def test_timm_train_script_checkpoint(tmp_path: Path, capsys) -> None:
    """timm's train checkpoints pickle their arguments as an argparse.Namespace (plain data,
    allowed); the trained weights are used, the EMA copy only when it is all the file holds."""
    model, ema = tiny().train(), randomized(DenseNet(**TINY), seed=1)
    state = timm_train_checkpoint(model, ema)
    path = tmp_path / "checkpoint-3.pth.tar"
    torch.save(state, path)
    loaded = densenet.load_pretrained(DenseNet(**TINY), path)
    assert_same_state(loaded.state_dict(), state["state_dict"])
    assert "using the weights under 'state_dict'" in capsys.readouterr().err
    only_ema = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "state_dict_ema": ema.state_dict()}, only_ema)
    assert_same_state(densenet.load_pretrained(DenseNet(**TINY), only_ema).state_dict(),
                      ema.state_dict())  # fmt: skip


# --- wrappers: prefixes and nesting -------------------------------------------------------------


def prefixed(state: dict, prefix: str) -> OrderedDict:
    return OrderedDict((prefix + k, v) for k, v in state.items())


WRAPPED = {
    "DataParallel": lambda s: prefixed(s, "module."),
    "DDP under state_dict": lambda s: {"state_dict": prefixed(s, "module."), "epoch": 9},
    "torch.compile": lambda s: prefixed(s, "_orig_mod."),
    "DDP of a compiled model": lambda s: prefixed(s, "module._orig_mod."),
    "Lightning": lambda s: {
        "epoch": 1,
        "global_step": 40,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": prefixed(s, "model."),
        "optimizer_states": [],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 0.1},
    },  # fmt: skip
    "model entry": lambda s: {"model": s, "epoch": 3},
    "nested model/state_dict": lambda s: {"model": {"state_dict": s}},
    "ema only": lambda s: {"ema": s},
    "model_ema only": lambda s: {"model_ema": prefixed(s, "module.")},
}


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("form", list(WRAPPED))
def test_wrapped_and_prefixed_state_dicts(tmp_path: Path, form: str, container: str) -> None:
    model = tiny()
    path = tmp_path / "wrapped.pth"
    torch.save(
        WRAPPED[form](model.state_dict()), path, _use_new_zipfile_serialization=container == "zip"
    )
    assert file_kind(path) == ("zip" if container == "zip" else "pickle")
    loaded = densenet.load_pretrained(DenseNet(**TINY), path)
    assert_same_state(loaded.state_dict(), model.state_dict())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("container", ["pth", "safetensors"])
def test_half_precision_files(tmp_path: Path, dtype: torch.dtype, container: str) -> None:
    """Weights saved after ``model.half()``: float tensors in fp16/bf16, BN counters int64."""
    model = tiny()
    state = model.to(dtype).state_dict()
    assert state[f"features.norm0.{COUNTER}"].dtype == torch.int64
    path = tmp_path / f"half.{container}"
    if container == "pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    loaded = densenet.load_pretrained(DenseNet(**TINY), path)
    assert loaded.features.conv0.weight.dtype == torch.float32
    assert_same_state(loaded.state_dict(), {k: v.float() for k, v in state.items()})
    assert torch.equal(outputs(loaded), outputs(model.float()))


@pytest.mark.parametrize(
    "dropped", ["features.denseblock2.denselayer1.conv2.weight", "classifier.weight"]
)
def test_partial_file_lists_what_is_missing(tmp_path: Path, dropped: str) -> None:
    """Missing BN counters are fine; a missing weight is not: the one-line error names it. (A
    file without "classifier.weight" but with "classifier.bias" loaded before, with a random
    head and the notice 'weights have 0 classes'.)"""
    state = {
        k: v for k, v in tiny().state_dict().items() if not k.endswith(COUNTER) and k != dropped
    }
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        densenet.load_pretrained(DenseNet(**TINY), path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert f"1 missing: {dropped}" in message
    assert COUNTER not in message


# --- a third-party layout (KEY_LAYOUTS) ---------------------------------------------------------

JASONWEI_ARCH = dict(
    growth_rate=12, block_config=(6, 12, 24), num_init_features=24, stem="cifar", num_classes=10
)
OURS_TO_JASONWEI = (
    (r"^features\.conv0\.", "conv0."),
    (r"^features\.denseblock(\d+)\.denselayer(\d+)\.norm(\d)\.", "features.denseblock{0}.block.{1}.bn{2}."),
    (r"^features\.denseblock(\d+)\.denselayer(\d+)\.conv(\d)\.", "features.denseblock{0}.block.{1}.conv{2}."),
    (r"^features\.transition(\d+)\.norm\.", "features.transition{0}.bn."),
    (r"^features\.norm5\.", "bn."),
    (r"^classifier\.", "fc."),
)  # fmt: skip


def jasonwei_key(key: str) -> str:
    for pattern, template in OURS_TO_JASONWEI:
        match = re.match(pattern, key)
        if match:
            groups = list(match.groups())
            if len(groups) > 1:
                groups[1] = str(int(groups[1]) - 1)  # their layers count from 0
            return template.format(*groups) + key[match.end() :]
    return key


@contextlib.contextmanager
def saved_from_gpu() -> Iterator[None]:
    """``torch.save`` as on a CUDA machine: every storage is tagged ``cuda:0``, so the file only
    loads on a machine without a GPU with ``map_location`` (torch's private location registry:
    the only way to write such a file without a GPU)."""
    registry = torch.serialization._package_registry
    saved = list(registry)
    registry.insert(0, (0, lambda storage: "cuda:0", lambda obj, location: None))
    try:
        yield
    finally:
        registry[:] = saved


def jasonwei_file(path: Path) -> tuple[Path, DenseNet]:
    """github.com/JasonWei05/DenseNet's CIFAR-10 checkpoint (../shared/data/checkpoints) in its
    real form: a zip torch.save, from a GPU, of an OrderedDict, 524 keys (conv0.*,
    block.i.{bn1,conv1,bn2,conv2}, transitionN.{bn,conv}, bn, fc), float32, int64 BN counters."""
    torch.manual_seed(0)
    model = randomized(DenseNet(**JASONWEI_ARCH))
    with saved_from_gpu():
        torch.save(OrderedDict((jasonwei_key(k), v) for k, v in model.state_dict().items()), path)
    return path, model


def test_third_party_layout_without_shared_data(tmp_path: Path) -> None:
    path, source = jasonwei_file(tmp_path / "jasonwei.pth")
    loaded = densenet.load_pretrained(DenseNet(**JASONWEI_ARCH), path)
    assert_same_state(loaded.state_dict(), source.state_dict())
    assert torch.equal(outputs(loaded), outputs(source))


def test_third_party_fixture_matches_the_real_file(tmp_path: Path) -> None:
    """The synthetic fixture above has the real file's keys, order, dtypes, shapes, container."""
    real_path = shared_data("checkpoints", "jasonwei05_densenet_cifar10.pth")
    path, _ = jasonwei_file(tmp_path / "jasonwei.pth")
    real, synthetic = (
        torch.load(p, map_location="cpu", weights_only=True) for p in (real_path, path)
    )
    assert list(real) == list(synthetic)
    assert all(real[k].dtype == v.dtype and real[k].shape == v.shape for k, v in synthetic.items())
    assert file_kind(real_path) == file_kind(path) == "zip"


# --- property-based: our own files, any metadata size; the sniffer -----------------------------


def header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def padded_to_first_byte(write, first_byte: int) -> Path:
    """Call ``write(padding)`` with growing padding text until the file's 8-byte safetensors
    header length starts with ``first_byte`` (headers are 8-byte aligned, so steps of 8)."""
    for size in range(0, 264, 8):
        path = write("x" * size)
        if header_length(path) & 0xFF == first_byte:
            return path
    raise AssertionError(f"no padding gives a header length starting with {first_byte:#x}")


@pytest.mark.parametrize("writer", ["save_weights", "save_state"])
def test_header_length_starting_with_0x80_reads_back(tmp_path: Path, writer: str) -> None:
    """Failed before: such files were taken for a pickle ('the file does not say which
    architecture it holds'); the default run's epoch-2 checkpoint was one."""
    model = tiny()

    def write(padding: str) -> Path:
        path = tmp_path / f"{writer}.safetensors"
        if writer == "save_weights":
            return densenet.save_weights(model, path, note=padding)
        return save_state(path, {"model": model.state_dict()}, {"model_config": model.config,
                                                                "note": padding})  # fmt: skip

    path = padded_to_first_byte(write, 0x80)
    assert path.read_bytes()[0] == 0x80 and file_kind(path) == "safetensors"
    rebuilt = densenet.create_model(pretrained=path)
    assert_same_state(rebuilt.state_dict(), model.state_dict())


METADATA = st.dictionaries(
    st.text(min_size=1, max_size=12), st.text(max_size=64) | st.integers() | st.none(), max_size=6
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(padding=st.integers(0, 70_000), extra=METADATA, writer=st.sampled_from(["weights", "state"]))
@example(padding=0, extra={}, writer="weights")
def test_every_file_we_write_reads_back(tmp_path: Path, padding: int, extra: dict, writer: str):
    """Any metadata size and content (unicode included): the header length takes every value
    mod 256 the 8-byte alignment allows, 0x80 and 0x8X included."""
    model = tiny()
    meta = {"note": "é" * (padding % 7) + "x" * padding, "extra": extra}
    path = tmp_path / "file.safetensors"
    if writer == "weights":
        densenet.save_weights(model, path, **meta)
    else:
        save_state(
            path, {"model": model.state_dict(), "epoch": 2}, {**meta, "model_config": model.config}
        )
    assert file_kind(path) == "safetensors"
    state, metadata = densenet.load_state_dict_file(path)
    assert metadata["note"] == meta["note"] and metadata["extra"] == extra
    assert_same_state(state, model.state_dict())
    if writer == "state":
        assert load_state(path)[0]["epoch"] == 2


TENSORS = st.dictionaries(
    st.text(alphabet="abcdefghij._", min_size=1, max_size=10),
    st.tuples(
        st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8]),
        st.lists(st.integers(0, 5), max_size=3),
    ),  # fmt: skip
    min_size=1,
    max_size=5,
)


def write_kind(kind: str, spec: dict, meta: str) -> bytes:
    """The bytes of a file of ``kind`` holding tensors shaped as ``spec`` says."""
    state = {k: torch.ones(shape, dtype=dtype) for k, (dtype, shape) in spec.items()}
    buffer = io.BytesIO()
    if kind == "safetensors":
        from safetensors.torch import save

        return save(state, metadata={"note": meta})
    torch.save({"state": state, "note": meta}, buffer, _use_new_zipfile_serialization=kind == "zip")
    return buffer.getvalue()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(kind=st.sampled_from(["safetensors", "zip", "pickle"]), spec=TENSORS, meta=st.text(max_size=300),
       cut=st.floats(0, 1, exclude_max=True))  # fmt: skip
def test_sniffer_never_mistakes_one_kind_for_another(tmp_path, kind, spec, meta, cut) -> None:
    """Whole files are their kind; a truncated safetensors or zip file is 'unknown' (an error
    naming the damage), never read as another kind."""
    data = write_kind(kind, spec, meta)
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    assert file_kind(path) == kind
    path.write_bytes(data[: int(len(data) * cut)])
    truncated = file_kind(path)
    assert truncated == ("pickle" if kind == "pickle" and cut * len(data) >= 2 else "unknown")
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        densenet.load_state_dict_file(path)
    if kind == "safetensors" and truncated == "unknown":
        with pytest.raises(CheckpointError):
            read_header(path)


PREFIXES = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", b"\x80\x00\x00\x00\x00\x00\x00\x00{"]


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(prefix=st.sampled_from(PREFIXES), rest=st.binary(max_size=400))
def test_any_bytes_are_one_clear_error(tmp_path: Path, prefix: bytes, rest: bytes) -> None:
    """Arbitrary bytes behind each kind's opening bytes: the sniffer answers, and reading is a
    one-line CheckpointError naming the file (never another exception or a traceback)."""
    path = tmp_path / "junk.pth"
    path.write_bytes(prefix + rest)
    assert file_kind(path) in ("safetensors", "zip", "pickle", "unknown")
    with pytest.raises(CheckpointError) as info:
        densenet.load_state_dict_file(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
