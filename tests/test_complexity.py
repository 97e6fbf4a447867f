"""Closed-form parameters and MACs (densenet.complexity) equal a built model's counted ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from densenet.complexity import count_macs, count_parameters, model_complexity, spec_complexity
from densenet.factory import create_model
from densenet.models import BLUR_MODES, STEMS, DenseNet
from densenet.zoo import get_model_spec, list_models


def meta_macs(model: torch.nn.Module, input_size) -> int:
    """count_macs's counting (FlopCounterMode: conv + linear), on the meta device: shapes only."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, *input_size, device="meta"))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_params_and_macs_exact(name):
    spec = get_model_spec(name)
    with torch.device("meta"):
        model = create_model(name)
    expected = spec_complexity(name)
    assert expected.params == count_parameters(model)
    assert expected.macs == meta_macs(model, spec.input_size)


def test_meta_counting_agrees_with_count_macs_on_real_tensors():
    # The helper above is count_macs on shapes only: check it once against the library function.
    model = create_model("densenetblur121d")
    assert meta_macs(model.to("meta"), (3, 96, 80)) == count_macs(
        create_model("densenetblur121d"), (3, 96, 80)
    )


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201"])
def test_torchvision_published_params_and_gmacs(name):
    # torchvision's weights metadata: num_params and "_ops" (GMACs at 224x224, 3 decimals).
    import torchvision.models

    meta = torchvision.models.get_model_weights(name).IMAGENET1K_V1.meta
    got = spec_complexity(name)
    assert got.params == meta["num_params"]
    assert round(got.macs / 1e9, 3) == meta["_ops"]


@st.composite
def densenet_arguments(draw):
    stem = draw(st.sampled_from(STEMS))
    return dict(
        growth_rate=draw(st.integers(1, 12)),
        block_config=tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))),
        num_init_features=draw(st.integers(1, 24)),
        bn_size=draw(st.sampled_from([None, 0, 1, 2, 4])),
        # At least half: a smaller theta can leave a transition 0 channels (DenseNet accepts
        # that but cannot run it).
        compression=draw(st.floats(0.5, 1.0)),
        stem=stem,
        stem_width=draw(st.none() | st.integers(1, 16)),
        # BlurPool only follows the ImageNet-style stems' pool (or every transition with 'all').
        blur=draw(st.sampled_from(BLUR_MODES if stem in ("imagenet", "deep") else ("none",))),
        in_chans=draw(st.integers(1, 4)),
        num_classes=draw(st.integers(0, 12)),
        global_pool=draw(st.sampled_from(["avg", "max"])),
    )


@settings(max_examples=60, deadline=None)
@given(arch=densenet_arguments(), data=st.data())
def test_random_architectures_params_and_macs_exact(arch, data):
    model = DenseNet(**arch)
    smallest = model.min_input_size()
    height = data.draw(st.integers(smallest, smallest + 40), label="height")
    width = data.draw(st.integers(smallest, smallest + 40), label="width")
    size = (arch["in_chans"], height, width)
    got = model_complexity(arch, size)
    assert got.params == count_parameters(model)
    assert got.macs == count_macs(model, size)
