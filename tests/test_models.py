"""The model family: exact published sizes, the timm-style interface and clear errors."""

from __future__ import annotations

import pytest
import torch

import densenet
from densenet import DenseNet, count_macs, count_parameters, create_model


def meta_params(name: str, **kwargs) -> int:
    with torch.device("meta"):
        return count_parameters(create_model(name, **kwargs))


@pytest.mark.parametrize(
    "name, expected",
    [
        ("densenet121", 7_978_856),
        ("densenet169", 14_149_480),
        ("densenet201", 20_013_928),
        ("densenet161", 28_681_000),
    ],
)
def test_torchvision_parameter_counts_exact(name, expected):
    assert meta_params(name) == expected


@pytest.mark.parametrize(
    "name, millions, digits",
    [
        ("densenet40_k12", 1.0, 1),
        ("densenet100_k12", 7.0, 1),
        ("densenet100_k24", 27.2, 1),
        ("densenet_bc100_k12", 0.8, 1),
        ("densenet_bc250_k24", 15.3, 1),
        ("densenet_bc190_k40", 25.6, 1),
        ("densenet_bc40_k36", 1.5, 1),
        ("densenet_bc40_k48", 2.7, 1),
        ("densenet_bc40_k60", 4.3, 1),
        ("densenetblur121d", 8.0, 1),
        ("densenet264", 33.3, 1),
        ("densenet264_k48", 72.7, 1),
        ("densenet264d", 72.74, 2),
    ],
)
def test_published_parameter_counts(name, millions, digits):
    assert round(meta_params(name) / 1e6, digits) == millions


def test_densenet121_macs_match_published():
    model = create_model("densenet121")
    assert 2.83e9 <= count_macs(model, (3, 224, 224)) <= 2.87e9


def test_list_models_and_patterns():
    names = densenet.list_models()
    assert names == sorted(names)
    for required in ("densenet121", "densenet264_k48", "densenetblur121d", "densenet_bc190_k40"):
        assert required in names
    assert densenet.list_models("densenet_bc40*") == [
        "densenet_bc40_k36",
        "densenet_bc40_k48",
        "densenet_bc40_k60",
    ]


def test_unknown_model_suggests_nearest():
    with pytest.raises(ValueError, match="did you mean densenet121"):
        create_model("densenet12")


@pytest.mark.parametrize("depth, bottleneck", [(41, True), (42, False), (11, True), (4, False)])
def test_cifar_densenet_rejects_impossible_depth(depth, bottleneck):
    with pytest.raises(ValueError, match=f"depth L={depth} does not fit"):
        densenet.cifar_densenet(depth, 12, bottleneck=bottleneck)


def test_cifar_densenet_rules_and_kwargs():
    bc = densenet.cifar_densenet(100, 12, num_classes=100, drop_rate=0.2, memory_efficient=True)
    assert bc.block_config == (16, 16, 16)
    assert bc.config["num_init_features"] == 24 and bc.config["compression"] == 0.5
    assert bc.num_classes == 100 and bc.memory_efficient
    assert all(b.memory_efficient for b in bc.dense_blocks())
    basic = densenet.cifar_densenet(40, 12, bottleneck=False, compression=1.0)
    assert basic.block_config == (12, 12, 12)
    assert basic.config["num_init_features"] == 16
    assert not basic.features.denseblock1.denselayer1.has_bottleneck
    # theta = 1 keeps all channels through the transitions
    assert basic.features.transition1.conv.out_channels == 16 + 12 * 12


def test_compression_uses_floor():
    model = DenseNet(growth_rate=5, block_config=(3, 3), num_init_features=7, compression=0.5,
                     stem="cifar", num_classes=2)  # fmt: skip
    assert model.features.transition1.conv.out_channels == (7 + 15) // 2
    model = DenseNet(growth_rate=5, block_config=(1, 1), num_init_features=6, compression=0.3,
                     stem="cifar", num_classes=2)  # fmt: skip
    assert model.features.transition1.conv.out_channels == 3  # floor(11 * 0.3) = 3


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="compression"):
        DenseNet(compression=0)
    with pytest.raises(ValueError, match="stem must be one of"):
        DenseNet(stem="resnet")
    with pytest.raises(TypeError, match="unknown DenseNet argument"):
        create_model("densenet121", growthrate=12)
    # 8 stem + 1 layer x 2 = 10 channels; 0.05 of them keeps none (before: a forward-time crash)
    with pytest.raises(ValueError, match="leaves transition1 with 0 of its 10 channels"):
        DenseNet(growth_rate=2, block_config=(1, 1), num_init_features=8, compression=0.05)


def test_unknown_create_model_argument_is_named_with_suggestions():
    # 'stride' is a local variable name inside DenseNet.__init__, not an argument: it used to
    # pass the check and fail in DenseNet(...) with Python's own unexpected-keyword TypeError.
    with pytest.raises(TypeError, match=r"unknown DenseNet argument 'stride'[^,]*; help\("):
        create_model("densenet121", stride=3)
    with pytest.raises(TypeError, match=r"'growthrate' \(did you mean growth_rate"):
        create_model("densenet121", growthrate=12)
    with pytest.raises(TypeError, match=r"'pretraind' \(did you mean pretrained\?\)"):
        densenet.cifar_densenet(40, 12, pretraind=True)


def test_every_published_layer_count_has_dropout_after_each_conv_but_the_first():
    model = densenet.cifar_densenet(10, 4, drop_rate=0.2)
    layer = model.features.denseblock1.denselayer1
    assert layer.drop1.p == 0.2 and layer.drop2.p == 0.2
    assert model.features.transition1.drop.p == 0.2
    assert not hasattr(model.features, "drop0")


def test_forward_features_head_and_classifier_interface():
    model = create_model("densenet121").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, 2, 2)
        assert feats.min() >= 0  # after the final BN-ReLU
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, 1024)
        torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model.get_classifier().out_features == 1000
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert model(x).shape == (2, 1024)
    model.set_grad_checkpointing(True)
    assert all(block.memory_efficient for block in model.dense_blocks())


@pytest.mark.parametrize(
    "name, size, strides",
    [("densenet121", 64, [4, 8, 16, 32]), ("densenet_bc100_k12", 32, [1, 2, 4])],
)
def test_features_only_returns_normalized_multiscale_maps(name, size, strides):
    extractor = create_model(name, features_only=True).eval()
    assert extractor.reduction() == strides
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        maps = extractor(x)
    assert [m.shape[1] for m in maps] == extractor.channels()
    assert [size // m.shape[-1] for m in maps] == strides
    assert all(m.min() >= 0 for m in maps)  # BN-ReLU applied
    with torch.no_grad():
        full = create_model(name).eval()
        full.load_state_dict(extractor.model.state_dict(), strict=False)
        torch.testing.assert_close(maps[-1], full.forward_features(x))
    subset = create_model(name, features_only=True, out_indices=(-1,))
    assert subset.reduction() == strides[-1:]


def test_features_only_rejects_bad_indices():
    with pytest.raises(ValueError, match="out of range"):
        create_model("densenet_bc100_k12", features_only=True, out_indices=(3,))


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(3, 64, 64), "4-D batch"),
        (torch.randn(1, 1, 64, 64), "expected 3 input channels"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "floating-point"),
        (torch.randn(1, 3, 28, 28), "too small .* at least 29x29"),
    ],
)
def test_bad_input_raises_clear_value_error(x, message):
    model = create_model("densenet121").eval()
    with pytest.raises(ValueError, match=message):
        model(x)


def test_min_input_size_is_exact():
    model = create_model("densenet121").eval()
    assert model.min_input_size() == 29  # torchvision's documented min_size
    with torch.no_grad():
        assert model(torch.randn(1, 3, 29, 29)).shape == (1, 1000)


@pytest.mark.parametrize("name", densenet.list_models())
def test_every_variant_trains_one_step(name):
    """Train-mode forward and backward, with the small input each family allows."""
    torch.manual_seed(0)
    spec = densenet.get_model_spec(name)
    size = 32
    model = create_model(name, num_classes=3, in_chans=2, drop_rate=0.1).train()
    x = torch.randn(2, 2, size, size)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert spec.family in ("imagenet", "cifar")


def test_train_mode_memory_efficient_matches_plain_including_bn_stats():
    torch.manual_seed(0)
    plain = densenet.cifar_densenet(16, 6, num_classes=5).double()
    efficient = densenet.cifar_densenet(16, 6, num_classes=5, memory_efficient=True).double()
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    for model in (plain, efficient):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for (name, a), b in zip(
        plain.state_dict().items(), efficient.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_torch_compile_traces_densenet121_without_graph_breaks():
    # aot_eager checks Dynamo/AOTAutograd capture of the whole model; inductor's C++ codegen for
    # densenet121 takes about two minutes here, so it is exercised on a small model below.
    model = create_model("densenet121").eval()
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_compile_inductor_small_model():
    model = densenet.cifar_densenet(10, 4).eval()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_torch_export_densenet121():
    model = create_model("densenet121").eval()
    x = torch.randn(2, 3, 64, 64)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x[:1]), model(x[:1]), rtol=1e-5, atol=1e-5)
