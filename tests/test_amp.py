"""amp: auto, the default: bf16 where the device computes bfloat16 natively, else none; resolved
once per run, printed, and recorded in config.yaml so that resumes keep the run's precision."""

from __future__ import annotations

import pytest
import torch
import yaml
from test_training import folder, tiny  # noqa: F401 (folder: a fixture)

from densenet import runtime
from densenet.config import TrainConfig, load_config
from densenet.train import resume_config, train
from densenet.train.epoch import autocast_factory, resolve_amp

CPU = torch.device("cpu")


@pytest.mark.parametrize(("native", "chosen"), [(True, "bf16"), (False, "none")])
def test_auto_is_bf16_exactly_where_the_device_computes_it_natively(monkeypatch, native, chosen):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    cfg, line = resolve_amp(TrainConfig(amp="auto"), CPU)
    assert cfg.amp == chosen
    assert line.startswith(f"amp: auto -> {chosen} (this CPU ")
    with autocast_factory(TrainConfig(amp="auto"), CPU)():
        assert torch.is_autocast_enabled("cpu") == native
        if native:
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_an_explicit_amp_is_kept_and_not_announced(monkeypatch, amp):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: amp == "none")
    cfg = TrainConfig(amp=amp)
    assert resolve_amp(cfg, CPU) == (cfg, None)


def test_auto_is_a_valid_choice_and_fp16_still_needs_cuda():
    assert load_config(None, {"amp": "auto"}).amp == "auto"
    with pytest.raises(ValueError, match="amp must be one of auto, none, bf16, fp16"):
        load_config(None, {"amp": "fp32"})
    with pytest.raises(ValueError, match="amp fp16 needs a CUDA device"):
        load_config(None, {"amp": "fp16", "device": "cpu"})


def test_a_run_records_what_auto_chose_and_its_resume_keeps_it(folder, tmp_path, monkeypatch):  # noqa: F811
    run = tmp_path / "r"
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    lines: list[str] = []
    cfg = tiny(folder, run, epochs=1, amp="auto", schedule="constant")
    train(cfg, progress=False, log=lines.append)
    assert "amp: auto -> bf16 (this CPU computes bfloat16 natively" in "\n".join(lines)
    assert yaml.safe_load((run / "config.yaml").read_text())["amp"] == "bf16"
    # Resumed where auto would now choose none (another machine): the run stays bf16.
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    lines.clear()
    train(resume_config(run, {"epochs": 2}), resume=run, progress=False, log=lines.append)
    assert not any(line.startswith("amp: auto") for line in lines)
    # It says that bf16 is emulated here (slow), not silently.
    assert any(line.startswith("amp: bf16 on a cpu without native bfloat16") for line in lines)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["amp"] == "bf16"
    assert "amp" not in saved["history"][-1]["changed"]
    # Asked for auto again on resume, it resolves here (none) and is recorded as a change.
    lines.clear()
    train(resume_config(run, {"epochs": 3, "amp": "auto"}), resume=run, progress=False,
          log=lines.append)  # fmt: skip
    assert "amp: auto -> none (this CPU has no native bfloat16: float32)" in lines
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["amp"] == "none" and saved["history"][-1]["changed"]["amp"] == ["bf16", "none"]


def test_the_default_is_auto():
    assert TrainConfig().amp == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="device auto must resolve to the CPU")
def test_fp16_on_the_cpu_is_refused_before_any_work(folder, tmp_path, monkeypatch):  # noqa: F811
    """With device auto resolving to the CPU, amp fp16 used to fail only after data and model
    were built; now at once, and no run directory is left."""
    from densenet.train import TrainingError, loop

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before amp was checked")

    monkeypatch.setattr(loop, "build_data", no_data)
    run = tmp_path / "r"
    cfg = tiny(folder, run, amp="fp16", device="auto")
    with pytest.raises(TrainingError, match="amp fp16 needs CUDA"):
        train(cfg, progress=False, log=lambda line: None)
    assert not run.exists()
