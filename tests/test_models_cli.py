"""``densenet models``: the zoo table (unchanged flags) and ``--weights``, the weights registry."""

from __future__ import annotations

import json

from densenet.cli import main
from densenet.hub.registry import WEIGHTS


def test_models_table_and_json_still_work(capsys) -> None:
    assert main(["models", "densenet_bc100*"]) == 0
    out = capsys.readouterr().out
    assert "densenet_bc100_k12" in out and "769,162" in out
    assert main(["models", "densenet121", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["name"] == "densenet121" and row["params"] == 7_978_856


def test_weights_table_lists_every_tag(capsys) -> None:
    assert main(["models", "--weights"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    for column in ("tag", "model", "source", "license", "input", "crop", "interp", "top-1"):
        assert column in header
    rows = {line.split()[0]: line for line in lines[1:] if line.split()[0] in WEIGHTS}
    assert set(rows) == set(WEIGHTS)
    tv = rows["densenet121.tv_in1k"].split()
    assert tv[1:4] == ["densenet121", "torchvision", "BSD-3-Clause"]
    assert tv[4:] == ["3x224x224", "0.875", "bilinear", "74.434", "91.972", "full"]
    assert rows["densenet169.tv_in1k"].split()[-1] == "prefix"
    timm = rows["densenet121.ra_in1k"].split()
    assert "timm" in timm and timm[-3:] == ["75.574", "-", "none"]  # no top-5, no hash published


def test_weights_json_and_pattern(capsys) -> None:
    # the pattern matches model names as well as tags
    assert main(["models", "densenet121", "--weights", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["tag"] for r in rows] == ["densenet121.ra_in1k", "densenet121.tv_in1k"]
    tv = rows[1]
    assert tv["source"] == "torchvision" and tv["url"] == WEIGHTS["densenet121.tv_in1k"].url
    assert tv["input_size"] == [3, 224, 224] and tv["crop_pct"] == 0.875
    assert tv["interpolation"] == "bilinear" and tv["full_sha256"] is True
    assert (tv["top1"], tv["top5"]) == (74.434, 91.972) and tv["license"].startswith("BSD")
    assert rows[0]["full_sha256"] is False and rows[0]["sha256"] is None
    assert main(["models", "*.tv_in1k", "--weights", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4


def test_weights_errors(capsys) -> None:
    assert main(["models", "zz*", "--weights"]) == 2
    assert "no weights match 'zz*'" in capsys.readouterr().err
    assert main(["models", "--weights", "--plot", "x.png"]) == 2
    assert "does not combine with --weights" in capsys.readouterr().err
