"""Issue 6, "Nothing lost, nothing trusted": the faults and bad inputs no other test file tries.

docs/reliability.md maps every point of the issue to the test that tries it (here or in
test_training, test_weights, test_data, test_configs, test_models) and the outcome. This file has:
kill -9 at random moments of a real CLI run (with SIGINT/SIGTERM among them) and an exact resume;
a full disk during checkpoint and file writes; damaged, truncated and disguised checkpoints (fuzzed);
code-carrying pickles and YAML; bad images at the training level; zip paths that escape; and the
four faults this work found and fixed (last section).
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from test_data import SHARED, make_image_folder

import densenet
from densenet import io as dio
from densenet.cli import main
from densenet.config import load_config
from densenet.io import CheckpointError, WriteError, atomic_write, load_state, save_state
from densenet.train import resume_config, run_dir, train

TINY_MODEL = {"growth_rate": 2, "block_config": [1, 1], "num_init_features": 4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), size=8, per_class=16, classes=2)


def tiny_args(folder: Path, out: Path, epochs: int = 1) -> list[str]:
    """CLI arguments of a 2-class 8x8 run of 4 steps per epoch on a ~100-parameter DenseNet, at
    a constant lr (so that a resume may add epochs: a cosine schedule ends at lr 0)."""
    return [
        "train", "--dataset", "folder", "--data-dir", str(folder), "--out", str(out),
        "--epochs", str(epochs), "--batch-size", "8", "--workers", "0", "--device", "cpu",
        "--deterministic", "--set", f"model_args={TINY_MODEL}", "--set", "schedule=constant",
        "--no-progress",
    ]  # fmt: skip


def checkpoint_files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "checkpoints").iterdir())}


def temporary_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def same(a, b) -> bool:
    """Exact equality of nested states: tensors bit for bit, everything else with ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# --- kill -9 at random moments, then --resume -------------------------------------------------
# The child is the real `densenet train` command. Test-only instrumentation (nothing in the
# library): it prints markers when an epoch's training starts (data.set_epoch), when evaluation
# starts and ends, and writes each .safetensors file in PIECES pieces PAUSE s apart, so that a
# kill can be aimed at the middle of a checkpoint write. The temporary file, and so the write,
# is real: the parent polls the checkpoint directory for it.
PIECES, PAUSE = 4, 0.03
BOOTSTRAP = f"""
import io, os, sys, time
import densenet.data, densenet.io, densenet.train.epoch
from densenet.cli import main

sys.stdout.reconfigure(line_buffering=True)  # "resuming ..." must arrive before a kill

def mark(text):
    os.write(1, (text + "\\n").encode())

def wrap(module, name, before, after=None):
    original = getattr(module, name)
    def wrapper(*args, **kwargs):
        mark(before(*args))
        result = original(*args, **kwargs)
        if after:
            mark(after)
        return result
    setattr(module, name, wrapper)

wrap(densenet.data, "set_epoch", lambda loader, epoch, *rest: f"TRAIN {{epoch}}")
wrap(densenet.train.epoch, "evaluate", lambda *args: "EVAL", "EVAL_DONE")
atomic_write = densenet.io.atomic_write

def slow_atomic_write(path, write, mode="wb"):
    if not str(path).endswith(".safetensors"):
        return atomic_write(path, write, mode)
    def in_pieces(f):
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()
        for i in range({PIECES}):
            f.write(data[i * len(data) // {PIECES}:(i + 1) * len(data) // {PIECES}])
            f.flush()
            time.sleep({PAUSE})
        mark("WROTE " + os.path.basename(path))
    return atomic_write(path, in_pieces, mode)

densenet.io.atomic_write = slow_atomic_write
sys.exit(main())
"""


class Child:
    """One `densenet train` process; its stdout lines are collected with their arrival times."""

    def __init__(self, args: list[str]) -> None:
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-c", BOOTSTRAP, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: list[tuple[float, str]] = []
        self.stderr = ""
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        for raw in self.process.stdout:
            self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))

    def _read_stderr(self) -> None:
        self.stderr = self.process.stderr.read().decode(errors="replace")

    def texts(self) -> list[str]:
        return [text for _, text in self.lines]

    def wait_until(self, condition, timeout: float = 120) -> bool:
        """Poll ``condition()`` every 2 ms; False if the process ended without it holding."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                self._readers[0].join(10)
                return condition()
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"timed out; stdout {self.texts()[-5:]}, stderr {self.stderr[-2000:]}")
            time.sleep(0.002)
        return True

    def finish(self, signum: int | None = None, timeout: float = 120) -> int:
        if signum is not None and self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            self.process.kill()
        for reader in self._readers:
            reader.join(10)
        return code


def kill_test_data(tmp_path: Path) -> list[str]:
    """Real Fashion-MNIST (640 train, 1000 test images) where available, else a 16x16 folder."""
    if (SHARED / "fashion-mnist").exists():
        return [
            "--data-dir", str(SHARED / "fashion-mnist"),
            "--set", "train_subset=640", "--set", "val_subset=1000",
        ]  # fmt: skip
    root = make_image_folder(tmp_path / "images", size=16, per_class=160, classes=4)
    return ["--dataset", "folder", "--data-dir", str(root)]


def last_position(run: Path) -> tuple[int, int] | None:
    """(epoch, step) of last.safetensors, loading it fully: it must never be unreadable."""
    path = run / "checkpoints" / "last.safetensors"
    if not path.exists():
        return None
    state, _ = load_state(path)
    return state["epoch"], state["step"]


def where_it_died(texts: list[str]) -> str:
    """The phase the process was in when it died, from its last marker."""
    markers = [t for t in texts if re.match(r"(TRAIN \d+|EVAL|EVAL_DONE|WROTE \S+)$", t)]
    if not markers:
        return "startup"
    return {"TRAIN": "train", "EVAL": "eval"}.get(markers[-1].split()[0], "after " + markers[-1])


def test_kill_9_at_random_moments_then_resume_is_bit_identical(tmp_path):
    """At least 12 SIGKILLs (before the first checkpoint, mid-epoch, mid-evaluation and in the
    middle of a checkpoint write) and a SIGINT and a SIGTERM, each followed by --resume (or by
    a fresh start with --overwrite while no checkpoint exists yet): no checkpoint is ever
    unreadable, each resume starts from the last complete checkpoint, no temporary file is left,
    and the final weights, EMA, optimizer state and metrics equal an uninterrupted run's."""
    epochs = 6
    common = [
        "--epochs", str(epochs), "--batch-size", "32", "--workers", "0", "--device", "cpu",
        "--deterministic", "--no-progress", *kill_test_data(tmp_path),
        "--set", "threads=1", "--set", "model_args={depth: 10, growth_rate: 6, stem: imagenet}",
        "--set", "augment=standard", "--set", "drop_rate=0.1", "--set", "ema_decay=0.9",
    ]  # fmt: skip

    # The uninterrupted run, which also times the phases.
    reference = Child(["train", "--out", str(tmp_path / "reference"), *common])
    assert reference.finish() == 0, reference.stderr
    times: dict[str, list[float]] = {"train": [], "eval": []}
    started = 0.0
    for moment, text in reference.lines:
        if text.startswith("TRAIN ") or text == "EVAL":
            if text == "EVAL":
                times["train"].append(moment - started)
            started = moment
        elif text == "EVAL_DONE":
            times["eval"].append(moment - started)
    t_train, t_eval = (statistics.median(times[k]) for k in ("train", "eval"))

    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    rng = random.Random(6)
    needed = {"startup": 1, "train": 3, "eval": 3, "write": 3}
    landed = dict.fromkeys(needed, 0)
    graceful = [signal.SIGTERM, signal.SIGINT]
    kills, report, checked_no_checkpoint = 0, [], False
    for attempt in range(40):
        if kills >= 12 and not graceful and all(landed[k] >= n for k, n in needed.items()):
            break
        position = last_position(run)
        done = position[0] if position else 0
        if position:
            args = ["train", "--resume", str(run), "--no-progress"]
        else:
            if (run / "config.yaml").exists() and not checked_no_checkpoint:
                # A run killed before its first checkpoint cannot be resumed, and says so.
                assert main(["train", "--resume", str(run)]) == 2
                checked_no_checkpoint = True
            args = ["train", "--out", str(run), "--overwrite", *common]  # start again
        skip = 1 if done + 2 < epochs and rng.random() < 0.4 else 0
        target = done + skip  # the epoch (0-based) to interrupt
        if graceful and target + 1 < epochs and rng.random() < 0.3:
            plan = signal.Signals(graceful[-1]).name
        else:
            short = [k for k, n in needed.items() if landed[k] < n]
            plan = rng.choice(short or list(needed))
        temps_before = set(temporary_files(checkpoints)) if checkpoints.exists() else set()
        child = Child(args)

        def trained(child=child, target=target):
            return f"TRAIN {target}" in child.texts()

        if plan == "startup":
            time.sleep(rng.uniform(0.2, 2.5))
        elif plan == "train" or plan.startswith("SIG"):
            if not child.wait_until(trained):
                pytest.fail(f"attempt {attempt} ended early: {child.stderr[-2000:]}")
            time.sleep(rng.uniform(0, 0.8 * t_train))
        elif plan == "eval":

            def evaluating(child=child, skip=skip):
                return child.texts().count("EVAL") > skip

            assert child.wait_until(evaluating), child.stderr[-2000:]
            time.sleep(rng.uniform(0, 0.8 * t_eval))
        else:  # "write": as soon as a new checkpoint temporary file appears, then a little more
            names = (".last.",) if rng.random() < 0.5 else (".last.", ".best.")

            def writing(child=child, names=names, temps_before=temps_before):
                return trained(child) and any(
                    t.startswith(names) and t not in temps_before
                    for t in (temporary_files(checkpoints) if checkpoints.exists() else [])
                )

            assert child.wait_until(writing), child.stderr[-2000:]
            time.sleep(rng.uniform(0, 0.7 * PIECES * PAUSE))

        if plan.startswith("SIG"):
            signum = graceful.pop()
            code = child.finish(signum)
            name = signal.Signals(signum).name
            assert code == 128 + signum, child.stderr
            assert f"{name} received: saved a checkpoint at step" in child.stderr
            assert f"--resume {run}" in child.stderr and "Traceback" not in child.stderr
            outcome = f"{name}: exit {code}, checkpoint at {last_position(run)}"
        else:
            child.finish(signal.SIGKILL)
            kills += 1
            phase = where_it_died(child.texts())
            left = set(temporary_files(checkpoints)) - temps_before if checkpoints.exists() else ()
            if plan == "write" and left:
                phase = "write"  # its temporary file is still there: killed mid-write
                partial = checkpoints / sorted(left)[0]
                phase += (
                    f" of {partial.name.split('.')[1]}.safetensors ({partial.stat().st_size} B)"
                )
            phase, detail = phase.split(" of ")[0], phase
            if phase in landed:
                landed[phase] += 1
            outcome = f"SIGKILL in {detail}"
        if position:  # it resumed from the last complete checkpoint, and never went back
            epoch, step = position
            if where_it_died(child.texts()) != "startup":
                assert f"resuming {run} at epoch {epoch + 1}, step {step}" in child.texts()
            assert last_position(run) >= position
        for path in checkpoints.glob("*.safetensors") if checkpoints.exists() else ():
            load_state(path)  # never unreadable (a damaged file raises CheckpointError)
        report.append(f"{attempt}: from {position}, aimed at {plan}: {outcome}")

    print("\n".join(report))
    assert kills >= 12 and not graceful, report
    assert all(landed[k] >= n for k, n in needed.items()), (landed, report)

    final = Child(["train", "--resume", str(run), "--no-progress"])
    assert final.finish() == 0, final.stderr
    a, _ = load_state(tmp_path / "reference" / "checkpoints" / "last.safetensors")
    b, _ = load_state(checkpoints / "last.safetensors")
    for key in ("model", "ema", "optimizer", "epoch", "step", "best_top1"):
        assert same(a[key], b[key]), key
    best_a = load_state(tmp_path / "reference" / "checkpoints" / "best.safetensors")[0]
    assert same(best_a["model"], load_state(checkpoints / "best.safetensors")[0]["model"])
    assert final.texts()[-2] == reference.texts()[-2]  # "done: ... top-1 ..."
    assert not temporary_files(checkpoints)  # stale ones from killed writers were removed


# --- a full disk --------------------------------------------------------------------------------
class _FullFile:
    """A file on a disk with ``room`` bytes left: writing more raises ENOSPC, as the OS does."""

    def __init__(self, file, disk: DiskFull) -> None:
        self.file, self.disk = file, disk

    def write(self, data) -> int:
        free = max(self.disk.room, 0)
        if len(data) > free:
            self.file.write(data[:free])
            self.disk.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


class DiskFull:
    """``os`` as densenet.io sees it, on a disk that fills up after ``room`` more bytes."""

    def __init__(self, room: int) -> None:
        self.room = room

    def __getattr__(self, name):
        return getattr(os, name)

    def fdopen(self, fd, *args, **kwargs):
        return _FullFile(os.fdopen(fd, *args, **kwargs), self)


class DiskFullIn(DiskFull):
    """A full disk for the files written in ``folder`` only (Linux: the path of an open fd),
    or only for those whose name starts with ``name``."""

    def __init__(self, folder: Path, name: str = "") -> None:
        super().__init__(room=0)
        self.folder = str(folder)
        self.name = name

    def fdopen(self, fd, *args, **kwargs):
        file = os.fdopen(fd, *args, **kwargs)
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        inside = str(path).startswith(self.folder) and path.name.startswith(f".{self.name}")
        return _FullFile(file, self) if inside else file


def test_atomic_write_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    atomic_write(path, lambda f: f.write(b"old contents"))
    monkeypatch.setattr(dio, "os", DiskFull(room=100))
    with pytest.raises(WriteError) as info:
        atomic_write(path, lambda f: f.write(b"x" * 1000))
    error = info.value
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert error.filename == str(path)
    assert str(error) == (
        f"could not write {path}: the disk is full (No space left on device); free some space "
        "or write elsewhere; the previous data.bin is intact"
    )
    assert path.read_bytes() == b"old contents" and os.listdir(tmp_path) == ["data.bin"]
    with pytest.raises(WriteError, match=r"new\.bin: the disk is full .*no partial file was left"):
        atomic_write(tmp_path / "new.bin", lambda f: f.write(b"y" * 1000))
    assert os.listdir(tmp_path) == ["data.bin"]
    monkeypatch.undo()
    # Other errors than OSError pass through unchanged, and also leave nothing behind.
    with pytest.raises(ZeroDivisionError):
        atomic_write(path, lambda f: 1 / 0)
    assert path.read_bytes() == b"old contents" and os.listdir(tmp_path) == ["data.bin"]


@pytest.mark.parametrize("full", ["everywhere", "metrics", "checkpoints"])
def test_full_disk_at_the_end_of_an_epoch(folder, tmp_path, monkeypatch, capsys, full):
    """A resume writes config.yaml (its history), then each epoch metrics.csv, curves.png and
    the checkpoints: the disk fills at the first (everywhere), for metrics.csv, or only for the
    checkpoints."""
    run = tmp_path / "r"
    assert main(tiny_args(folder, run, epochs=1)) == 0
    before = checkpoint_files(run)
    metrics = (run / "metrics.csv").read_bytes()
    capsys.readouterr()
    disk = {
        "everywhere": DiskFull(room=0),
        "metrics": DiskFullIn(run, "metrics.csv"),
        "checkpoints": DiskFullIn(run / "checkpoints"),
    }[full]
    monkeypatch.setattr(dio, "os", disk)
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 2
    error = capsys.readouterr().err
    failed = {
        "everywhere": r"config\.yaml",
        "metrics": r"metrics\.csv",
        "checkpoints": r"checkpoints/(best|last)\.safetensors",
    }[full]
    assert re.search(
        rf"densenet train: error: could not write {re.escape(str(run))}/{failed}: the disk is "
        r"full \(No space left on device\); free some space or write elsewhere; the previous "
        r"(config\.yaml|metrics\.csv|best\.safetensors|last\.safetensors) is intact",
        error,
    ), error
    assert "Traceback" not in error
    assert checkpoint_files(run) == before  # both checkpoints intact, no temporary file
    if full != "checkpoints":
        assert (run / "metrics.csv").read_bytes() == metrics
    monkeypatch.undo()  # space is back: the run continues from the last checkpoint
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert load_state(run / "checkpoints" / "last.safetensors")[0]["epoch"] == 2
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]  # no row lost, none twice


# --- atomic writes: leftovers of killed writers, permissions -----------------------------------
def test_temporary_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = dio._HOST
    stale = tmp_path / f".last.safetensors.{host}-{dead.pid}-abc123.tmp"
    live = tmp_path / f".last.safetensors.{host}-{os.getppid()}-abc123.tmp"
    elsewhere = tmp_path / f".last.safetensors.otherhost-{dead.pid}-abc123.tmp"
    unrelated = tmp_path / "notes.tmp"
    for path in (stale, live, elsewhere, unrelated):
        path.write_bytes(b"partial")
    atomic_write(tmp_path / "metrics.csv", lambda f: f.write("epoch\n"), mode="w")
    assert temporary_files(tmp_path) == sorted(p.name for p in (live, elsewhere, unrelated))


def test_written_files_keep_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    new = atomic_write(tmp_path / "new.bin", lambda f: f.write(b"1"))
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would: not mkstemp's 0600
    new.chmod(0o640)
    atomic_write(new, lambda f: f.write(b"2"))
    assert new.stat().st_mode & 0o777 == 0o640 and new.read_bytes() == b"2"


# --- damaged, truncated and disguised checkpoints ------------------------------------------------
def _checkpoint(tmp_path: Path) -> tuple[Path, dict]:
    torch.manual_seed(0)
    model = densenet.DenseNet(**TINY_MODEL, num_classes=3)
    state = {"model": model.state_dict(), "epoch": 3, "step": 12, "names": ("a", "b")}
    path = save_state(tmp_path / "ck.safetensors", state, {"model_config": model.config})
    return path, state


def test_every_damaged_byte_or_truncation_is_refused_naming_the_file(tmp_path):
    """Every truncation point, and 400 random single-byte changes anywhere in the file: each
    either raises CheckpointError naming the file, or (a change in the JSON header's padding or
    whitespace) loads exactly the saved state. Nothing else: no torch or JSON error, no silently
    changed tensor."""
    path, state = _checkpoint(tmp_path)
    good = path.read_bytes()
    damaged = tmp_path / "damaged.safetensors"
    header_end = 8 + int.from_bytes(good[:8], "little")
    rng = random.Random(0)
    cases = [good[:n] for n in range(0, len(good), 7)]
    for _ in range(400):
        data = bytearray(good)
        i = rng.randrange(len(data)) if rng.random() < 0.5 else rng.randrange(header_end)
        data[i] ^= rng.randrange(1, 256)
        cases.append(bytes(data))
    refused = 0
    for data in cases:
        damaged.write_bytes(data)
        try:
            loaded, _ = load_state(damaged)
        except CheckpointError as error:
            assert str(damaged) in str(error)
            refused += 1
        else:
            assert same(loaded, state), "a damaged file loaded different contents"
    assert refused > 0.9 * len(cases)


def test_damaged_tensor_data_or_metadata_fails_the_checksum(tmp_path):
    path, _ = _checkpoint(tmp_path)
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[-3] ^= 0x01  # one bit of the last tensor: still a valid safetensors file
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"ck\.safetensors: corrupt file: .*SHA-256"):
        load_state(path)
    assert b'[\\"epoch\\", 3]' in good  # the JSON tree in the header: a same-length edit
    path.write_bytes(good.replace(b'[\\"epoch\\", 3]', b'[\\"epoch\\", 7]'))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_state(path)
    # Files without a checksum (written before it existed, or by other tools) still load.
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    assert torch.equal(load_state(plain)[0]["w"], torch.ones(2))


class Payload:
    """Unpickling this runs code: it creates the file ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').close()",))


def test_resume_from_a_damaged_or_disguised_checkpoint_is_a_clear_error(folder, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(tiny_args(folder, run, epochs=1)) == 0
    last = run / "checkpoints" / "last.safetensors"
    good = last.read_bytes()
    marker = tmp_path / "pwned"
    pickle_file = tmp_path / "evil.pth"
    torch.save({"model": Payload(marker)}, pickle_file)
    torch.load(pickle_file, weights_only=False)  # the payload is real: loading it runs it
    assert marker.exists()
    marker.unlink()
    damaged = bytearray(good)
    damaged[-3] ^= 0xFF  # in the tensor data, at the end of the file
    cases = {
        "truncated": (good[: len(good) // 2], "truncated"),
        "a flipped byte": (bytes(damaged), "corrupt file"),
        "empty": (b"", "empty or truncated"),
        "a pickle with code": (pickle_file.read_bytes(), "not a safetensors file"),
    }
    capsys.readouterr()
    for what, (data, message) in cases.items():
        last.write_bytes(data)
        metrics = (run / "metrics.csv").read_bytes()
        assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 2, what
        error = capsys.readouterr().err
        assert error.startswith(f"densenet train: error: {last}: ") and message in error, what
        assert error.count("\n") == 1 and "Traceback" not in error, what
        assert (run / "metrics.csv").read_bytes() == metrics and last.read_bytes() == data
        assert not marker.exists(), "loading a checkpoint ran code"


def test_our_files_load_without_unpickling_and_pth_only_with_weights_only(tmp_path, monkeypatch):
    path, state = _checkpoint(tmp_path)
    weights_file = densenet.save_weights(
        densenet.DenseNet(**TINY_MODEL), tmp_path / "w.safetensors"
    )
    pth = tmp_path / "foreign.pth"
    torch.save(densenet.DenseNet(**TINY_MODEL).state_dict(), pth)
    calls = []
    torch_load = torch.load

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return torch_load(*args, **kwargs)

    import pickle

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, no_unpickling)
    monkeypatch.setattr(torch, "load", spy)
    assert same(load_state(path)[0], state)
    densenet.load_state_dict_file(weights_file)
    densenet.create_model(pretrained=weights_file)
    assert calls == []  # safetensors plus JSON: no torch.load, no pickle
    densenet.load_state_dict_file(pth)
    assert calls == [True]  # a foreign .pth: torch.load(weights_only=True) only


# --- code in configs ----------------------------------------------------------------------------
def test_yaml_with_code_is_refused_and_never_run(folder, tmp_path, capsys):
    marker = tmp_path / "pwned"
    text = f"epochs: !!python/object/apply:builtins.open [{str(marker)!r}, w]\n"
    yaml.unsafe_load(text)  # the payload is real: an unsafe loader creates the file
    assert marker.exists()
    marker.unlink()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(ValueError, match=r"recipe\.yaml: not valid YAML"):
        load_config(recipe)
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "x")]) == 2
    assert "recipe.yaml: not valid YAML" in capsys.readouterr().err
    run = tmp_path / "r"  # a run directory whose config.yaml was replaced
    assert main(tiny_args(folder, run, epochs=1)) == 0
    (run / "config.yaml").write_text(text)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "config.yaml: not valid YAML" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "x").exists()


# --- archives -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "member",
    ["../escape/c0/evil.png", "train/../../c0/evil.png", "/abs/c0/evil.png", "C:/c0/x.png"],
)
def test_zip_members_that_escape_are_refused(tmp_path, member):
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("train/c0/ok.png", b"x")
        z.writestr(member, b"x")
    with pytest.raises(ValueError, match=f"images.zip: unsafe path {re.escape(repr(member))}"):
        densenet.data.build_dataset("folder", archive, "train")


# --- bad images, at the training level ---------------------------------------------------------
def test_bad_images_stop_training_naming_the_file_or_are_skipped_and_counted(tmp_path, capsys):
    root = make_image_folder(tmp_path / "images", size=8, per_class=8)
    (root / "train" / "c1" / "broken.png").write_bytes(b"not a png at all")
    (root / "test" / "c0" / "cut.png").write_bytes(
        (root / "test" / "c0" / "0.png").read_bytes()[:40]
    )
    (root / "train" / "c0" / "notes.txt").write_text("not an image, and not named like one")
    run = tmp_path / "r"
    assert main(tiny_args(root, run)) == 2
    error = capsys.readouterr().err
    assert re.search(r"broken\.png is not a readable image .*--skip-bad-images", error), error
    assert error.count("\n") == 1 and not (run / "checkpoints").exists()
    run = tmp_path / "r2"
    assert main([*tiny_args(root, run), "--skip-bad-images"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 unreadable images (--skip-bad-images)" in out  # notes.txt is not an image
    assert load_state(run / "checkpoints" / "last.safetensors")[0]["epoch"] == 1


def test_bad_image_read_by_a_loader_worker_is_one_clear_line(tmp_path, capsys):
    root = make_image_folder(tmp_path / "images", size=72, per_class=8)  # > 64 px: read lazily
    (root / "train" / "c1" / "broken.png").write_bytes(b"not a png at all")
    args = tiny_args(root, tmp_path / "r")
    args[args.index("--workers") + 1] = "1"
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "broken.png is not a readable image" in error
    # One line of error after the run's notice of what it validates on (this folder: test/).
    lines = [line for line in error.splitlines() if "validating on test/" not in line]
    assert "Traceback" not in error and len(lines) == 1, error


# --- faults found by these tests, fixed (see docs/reliability.md) --------------------------------
def test_kill_between_checkpoint_and_metrics_loses_no_metrics_row(folder, tmp_path, monkeypatch):
    class Killed(BaseException):
        pass

    write_metrics = run_dir.RunDir.write_metrics

    def killed_at_epoch_2(self, rows):
        if len(rows) == 2:
            raise Killed  # as a kill -9 right after checkpoints/last.safetensors of epoch 2
        write_metrics(self, rows)

    cfg = load_config(
        None,
        {
            "dataset": "folder", "data_dir": str(folder), "model_args": TINY_MODEL,
            "batch_size": 8, "epochs": 3, "workers": 0, "device": "cpu",
            "out": str(tmp_path / "r"), "deterministic": True,
        },
    )  # fmt: skip
    monkeypatch.setattr(run_dir.RunDir, "write_metrics", killed_at_epoch_2)
    with pytest.raises(Killed):
        train(cfg, progress=False, log=lambda _: None)
    monkeypatch.undo()
    run = tmp_path / "r"
    train(resume_config(run), resume=run, progress=False, log=lambda _: None)
    epochs = [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"], epochs


def test_resume_with_another_architecture_is_a_clear_error(folder, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(tiny_args(folder, run, epochs=1)) == 0
    other = "model_args={growth_rate: 4, block_config: [1, 1], num_init_features: 4}"
    assert main(["train", "--resume", str(run), "--epochs", "2", "--set", other]) == 2
    error = capsys.readouterr().err
    assert f"cannot resume {run} with another model_args (" in error
    assert "the checkpoint holds this run's model, which does not fit another one" in error


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(3, 32, 32),
        torch.randn(1, 1, 32, 32),
        torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
        torch.randn(1, 3, 2, 2),
    ],
    ids=["rank", "channels", "dtype", "too-small"],
)
def test_optimized_model_checks_its_input_like_the_model(x):
    model = densenet.create_model("densenet_bc100_k12").eval()
    fast = densenet.optimize_for_inference(model, backend="eager")
    with pytest.raises(ValueError, match=r"expected|too small"):
        model(x)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)|floating-point|at least"):
        fast(x)
