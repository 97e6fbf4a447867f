"""Weights registry, downloads, file formats, key layouts, safety and the errors users see.

Downloads use file:// URLs of files made here and a loopback HTTP server that honours Range; no
test touches the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import re
import threading
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import densenet
from densenet import DenseNet, zoo
from densenet.hub import download
from densenet.hub.registry import WEIGHTS, Weights
from densenet.io import CheckpointError, save_state

TINY = dict(growth_rate=4, block_config=(2, 2), num_init_features=8)


@pytest.fixture(autouse=True)
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache per test."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def tiny(**kwargs) -> DenseNet:
    torch.manual_seed(0)
    model = DenseNet(**{**TINY, "num_classes": 5, **kwargs})
    for m in model.modules():  # non-trivial BN statistics, so a dropped buffer shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def outputs(model: torch.nn.Module, channels: int = 3) -> torch.Tensor:
    x = torch.randn(2, channels, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- registry -----------------------------------------------------------------------------------


def test_registry_entries_are_complete_and_consistent() -> None:
    assert {
        "densenet121.tv_in1k", "densenet161.tv_in1k", "densenet169.tv_in1k",
        "densenet201.tv_in1k", "densenet121.ra_in1k", "densenetblur121d.ra_in1k",
    } <= set(WEIGHTS)  # fmt: skip
    for tag, entry in WEIGHTS.items():
        assert entry.tag == tag and entry.model_name in densenet.list_models()
        assert entry.url.startswith("https://") and entry.license and entry.metrics_source
        assert 70 < entry.top1 < 80 and len(entry.mean) == len(entry.std) == 3
        if entry.sha256 is not None:
            assert re.fullmatch(r"[0-9a-f]{8}|[0-9a-f]{64}", entry.sha256)
            # torchvision's file names carry the digest's first hex digits
            assert entry.sha256.startswith(re.search(r"-([0-9a-f]{8})\.", entry.url)[1])
    for name in densenet.list_models():
        default = densenet.get_model_spec(name).default_weights
        assert default is None or densenet.get_weights(default).model_name == name
    assert densenet.list_weights("densenet121.*") == ["densenet121.ra_in1k", "densenet121.tv_in1k"]


def test_tag_errors_need_no_download() -> None:
    with pytest.raises(ValueError, match="are for densenet121, not densenet169"):
        densenet.create_model("densenet169", pretrained="densenet121.tv_in1k")
    with pytest.raises(ValueError, match="did you mean densenet121.tv_in1k"):
        densenet.create_model("densenet121", pretrained="densenet121.tv_in1")
    with pytest.raises(ValueError, match="has no published weights"):
        densenet.create_model("densenet264", pretrained=True)


@pytest.fixture
def served_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, DenseNet]:
    """Registry entry 'densenet_bc100_k12.test' served from a file:// URL with its SHA256."""
    model = densenet.create_model("densenet_bc100_k12")
    path = tmp_path / "server" / "bc100.pth"
    path.parent.mkdir()
    torch.save(model.state_dict(), path)
    entry = Weights(
        tag="densenet_bc100_k12.test", url=path.as_uri(), sha256=sha256(path), license="test",
        top1=None, top5=None, metrics_source="test", file_name="bc100-test.pth", num_classes=10,
        input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0,
    )  # fmt: skip
    monkeypatch.setitem(WEIGHTS, entry.tag, entry)
    return path, model


def test_registry_tag_downloads_checks_and_reuses_cache(
    served_weights, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, reference = served_weights
    model = densenet.create_model("densenet_bc100_k12.test", pretrained=True)
    assert same_weights(model, reference)
    cached = hub_cache / "bc100-test.pth"
    assert cached.is_file() and not list(hub_cache.glob("*.partial"))
    assert model.pretrained_cfg["tag"] == "densenet_bc100_k12.test"
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    path.unlink()  # the cached copy is used: no second download
    again = densenet.create_model("densenet_bc100_k12", pretrained="densenet_bc100_k12.test")
    assert same_weights(again, reference)
    # pretrained=True on a bare name takes the model's default tag
    spec = dataclasses.replace(
        densenet.get_model_spec("densenet_bc100_k12"), default_weights="densenet_bc100_k12.test"
    )
    monkeypatch.setitem(zoo._REGISTRY, spec.name, spec)
    default = densenet.create_model("densenet_bc100_k12", pretrained=True)
    assert same_weights(default, reference)
    assert default.pretrained_cfg["tag"] == "densenet_bc100_k12.test"


# --- downloads ----------------------------------------------------------------------------------


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "blob.bin"
    path.write_bytes(torch.randint(0, 256, (3_000_000,), dtype=torch.uint8).numpy().tobytes())
    return path


def test_hash_mismatch_is_an_error_and_the_file_is_deleted(blob: Path, tmp_path: Path) -> None:
    dest = tmp_path / "cache" / "blob.bin"
    with pytest.raises(CheckpointError, match="does not match its SHA256.*deleted"):
        download.download(blob.as_uri(), dest, sha256="00" * 32, progress=False)
    assert not dest.exists() and not list(dest.parent.iterdir())
    # a prefix, as in torchvision's file names, is checked too
    assert download.download(blob.as_uri(), dest, sha256(blob)[:8], progress=False) == dest
    # a corrupted cached file is not used: it is replaced by a good download
    dest.write_bytes(b"corrupt")
    download.download(blob.as_uri(), dest, sha256(blob), progress=False)
    assert sha256(dest) == sha256(blob)


def test_interrupted_download_keeps_partial_and_resumes(
    blob: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "cache" / "blob.bin"
    partial = dest.with_name("blob.bin.partial")
    copy = download._copy_with_progress
    received = []

    def drop_connection(stream, partial_path, offset, total, name, progress):
        received.append(offset)
        partial_path.parent.mkdir(parents=True, exist_ok=True)
        partial_path.write_bytes(stream.read(1_000_000))
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(download, "_copy_with_progress", drop_connection)
    with pytest.raises(CheckpointError, match="resumes"):
        download.download(blob.as_uri(), dest, sha256(blob), progress=False)
    assert partial.stat().st_size == 1_000_000 and not dest.exists()

    def record(stream, partial_path, offset, total, name, progress):
        received.append(offset)
        copy(stream, partial_path, offset, total, name, progress)

    monkeypatch.setattr(download, "_copy_with_progress", record)
    download.download(blob.as_uri(), dest, sha256(blob), progress=False)
    assert received == [0, 1_000_000]  # the second attempt started where the first stopped
    assert sha256(dest) == sha256(blob) and not partial.exists()


def test_a_download_that_never_started_names_no_partial_file(tmp_path: Path) -> None:
    missing = tmp_path / "not-served.bin"  # file:// of a file that is not there: nothing arrives
    with pytest.raises(CheckpointError) as error:
        download.download(missing.as_uri(), tmp_path / "cache" / "x.bin", "0" * 64, progress=False)
    assert str(error.value).endswith("; nothing arrived") and ".partial" not in str(error.value)


def test_resumed_bytes_are_hash_checked(blob: Path, tmp_path: Path) -> None:
    """A partial file that is not a prefix of the real one gives a bad file, which is refused."""
    dest = tmp_path / "cache" / "blob.bin"
    dest.parent.mkdir()
    dest.with_name("blob.bin.partial").write_bytes(b"\0" * 1000)
    with pytest.raises(CheckpointError, match="SHA256"):
        download.download(blob.as_uri(), dest, sha256(blob), progress=False)
    assert not list(dest.parent.iterdir())


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``self.server.payload`` and honours ``Range: bytes=N-`` with 206."""

    def do_GET(self) -> None:
        data = self.server.payload
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(match[1]) if match else 0
        self.server.requests.append(start)
        self.send_response(206 if match else 200)
        if match:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args) -> None:
        pass


def test_http_download_resumes_with_range(blob: Path, tmp_path: Path) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    server.payload, server.requests = blob.read_bytes(), []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/blob.bin"
        dest = tmp_path / "cache" / "blob.bin"
        dest.parent.mkdir()
        dest.with_name("blob.bin.partial").write_bytes(server.payload[:1234])
        download.download(url, dest, sha256(blob), progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert server.requests == [1234]
    assert sha256(dest) == sha256(blob)


def test_url_source_goes_to_hub_cache(tmp_path: Path, hub_cache: Path) -> None:
    model = densenet.create_model("densenet_bc100_k12")
    path = tmp_path / "bc100-weights.safetensors"
    densenet.save_weights(model, path)
    loaded = densenet.create_model(pretrained=path.as_uri())
    assert same_weights(loaded, model)
    assert (hub_cache / path.name).is_file()


# --- formats and layouts ------------------------------------------------------------------------


def test_our_weights_and_training_checkpoints_round_trip(tmp_path: Path) -> None:
    model = densenet.create_model("densenet_bc100_k12", num_classes=7)
    with torch.no_grad():
        model.classifier.bias.uniform_()
    weights_file = densenet.save_weights(model, tmp_path / "w.safetensors", dataset="test")
    rebuilt = densenet.create_model(pretrained=weights_file)
    assert rebuilt.model_name == "densenet_bc100_k12" and rebuilt.num_classes == 7
    assert torch.equal(outputs(rebuilt), outputs(model))
    state, meta = densenet.load_state_dict_file(weights_file)
    assert meta["model"] == "densenet_bc100_k12" and meta["dataset"] == "test"

    # a training checkpoint: the state dict under "model", next to optimizer state
    custom = tiny(drop_rate=0.1)  # an unregistered architecture
    checkpoint = tmp_path / "ckpt.safetensors"
    save_state(
        checkpoint,
        {"model": custom.state_dict(), "optimizer": {"step": torch.tensor(3.0)}, "epoch": 3},
        {"model": None, "model_config": custom.config, "mean": [0.1, 0.2, 0.3]},
    )
    rebuilt = densenet.create_model(pretrained=checkpoint)
    assert rebuilt.config == custom.config and rebuilt.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)
    assert torch.equal(outputs(rebuilt), outputs(custom))


def test_legacy_torchvision_keys_and_back_to_torchvision(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tv = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8)
    tv.eval()
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in tv.state_dict().items()
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    path = tmp_path / "legacy.pth"
    torch.save(legacy, path)
    ours = DenseNet(**TINY)
    densenet.load_pretrained(ours, path)
    assert torch.allclose(outputs(ours), outputs(tv), rtol=1e-5, atol=1e-6)

    back = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8)
    back.load_state_dict(densenet.to_torchvision_state_dict(ours), strict=True)
    assert torch.allclose(outputs(back), outputs(ours), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="stem='cifar'"):
        densenet.to_torchvision_state_dict(DenseNet(**TINY, stem="cifar"))


def test_data_parallel_prefix_and_wrapped_state_dicts(tmp_path: Path) -> None:
    model = tiny()
    for i, state in enumerate(
        [
            {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
            {"model": model.state_dict(), "epoch": 1},
        ]
    ):
        path = tmp_path / f"{i}.pth"
        torch.save(state, path)
        assert same_weights(densenet.load_pretrained(tiny(drop_rate=0.2), path), model)


def test_plain_safetensors_file(tmp_path: Path) -> None:
    model = tiny()
    path = tmp_path / "plain.safetensors"
    save_file(model.state_dict(), str(path))
    assert same_weights(densenet.load_pretrained(DenseNet(**TINY, num_classes=5), path), model)


# --- safety and errors --------------------------------------------------------------------------


class Payload:
    """Unpickling this runs code: it creates the file ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').close()",))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_malicious_pickle_is_refused(tmp_path: Path, container: str) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = {"features.conv0.weight": torch.zeros(1), "extra": Payload(target)}
    torch.save(state, path, _use_new_zipfile_serialization=container == "zip")
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused to load"):
        densenet.create_model("densenet121", pretrained=path)
    with pytest.raises(CheckpointError, match="refused"):
        densenet.load_state_dict_file(path)
    assert not target.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert target.exists()


def test_corrupt_truncated_and_foreign_files_name_the_file(tmp_path: Path) -> None:
    model = tiny()
    good_pth = tmp_path / "good.pth"
    torch.save(model.state_dict(), good_pth)
    good_st = densenet.save_weights(model, tmp_path / "good.safetensors")
    cases = {
        "truncated.pth": good_pth.read_bytes()[: good_pth.stat().st_size // 2],
        "truncated.safetensors": good_st.read_bytes()[: good_st.stat().st_size // 2],
        "text.pth": b"this is not a checkpoint\n",
        "empty.pth": b"",
    }
    for file_name, data in cases.items():
        path = tmp_path / file_name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            densenet.load_pretrained(tiny(), path)
    not_weights = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_weights)
    with pytest.raises(CheckpointError, match="no state dict found"):
        densenet.load_pretrained(tiny(), not_weights)
    with pytest.raises(ValueError, match="no weights tag, URL or existing file"):
        densenet.create_model("densenet121", pretrained=tmp_path / "missing.pth")


def test_wrong_architecture_lists_keys_and_suggests_model(tmp_path: Path) -> None:
    source = densenet.create_model("densenet_bc100_k12")
    path = densenet.save_weights(source, tmp_path / "bc100.safetensors")
    with pytest.raises(CheckpointError) as info:
        densenet.create_model("densenet40_k12", pretrained=path)
    message = str(info.value)
    assert "bc100.safetensors" in message and "look like densenet_bc100_k12" in message
    assert re.search(r"\d+ unexpected: features\.\S+", message)
    # missing, unexpected and shapes; the model is untouched: nothing is copied before the check
    target = tiny(block_config=(3, 1))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        densenet.load_pretrained(target, densenet.save_weights(tiny(), tmp_path / "t.safetensors"))
    message = str(info.value)
    assert "missing: features.denseblock1.denselayer3.norm1.weight" in message
    assert "unexpected: features.denseblock2.denselayer2.norm1.weight" in message
    assert re.search(r"\d+ shape: \S+: weights \(\d+.*\) vs model \(\d+", message)
    assert "DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    # weights with no architecture metadata need a name
    plain = tmp_path / "plain.pth"
    torch.save(source.state_dict(), plain)
    with pytest.raises(CheckpointError, match="pass the model name.*densenet_bc100_k12"):
        densenet.create_model(pretrained=plain)


# --- head and input adaptation ------------------------------------------------------------------


def test_new_num_classes_resets_head_with_notice(tmp_path: Path, capsys) -> None:
    source = densenet.create_model("densenet_bc100_k12")
    path = densenet.save_weights(source, tmp_path / "w.safetensors")
    model = densenet.create_model("densenet_bc100_k12", pretrained=path, num_classes=3)
    assert "new 3-class classifier" in capsys.readouterr().err
    assert model.classifier.out_features == 3 and model.pretrained_cfg["num_classes"] == 3
    own, theirs = model.state_dict(), source.state_dict()
    assert all(torch.equal(own[k], theirs[k]) for k in own if not k.startswith("classifier."))
    # loading into a model built with another head keeps that head, with a notice
    other = densenet.load_pretrained(tiny(num_classes=2), densenet.save_weights(tiny(), path))
    assert (
        other.classifier.out_features == 2 and "keeping the model's new" in capsys.readouterr().err
    )


def test_in_chans_adaptation(tmp_path: Path) -> None:
    rgb = tiny()
    path = densenet.save_weights(rgb, tmp_path / "w.safetensors")
    gray = densenet.load_pretrained(tiny(in_chans=1), path)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # a gray image replicated to RGB gives the same output
        assert torch.allclose(gray(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-6)
        six = densenet.load_pretrained(tiny(in_chans=6), path)
        x3 = torch.randn(2, 3, 32, 32)
        assert torch.allclose(six(x3.repeat(1, 2, 1, 1)), rgb(x3), rtol=1e-5, atol=1e-6)
    w = rgb.features.conv0.weight
    four = densenet.load_pretrained(tiny(in_chans=4), path).features.conv0.weight
    assert torch.allclose(four, torch.cat([w, w[:, :1]], 1) * 3 / 4)
    cfg = densenet.create_model("densenet_bc100_k12", in_chans=1).pretrained_cfg
    assert len(cfg["mean"]) == len(cfg["std"]) == 1 and cfg["input_size"] == (1, 32, 32)
