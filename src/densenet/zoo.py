"""The model table: every named DenseNet variant, as data (no torch).

Each entry says which :class:`~densenet.models.DenseNet` arguments make the published model, the
input it expects, and the accuracy its authors reported (with the source), so ``densenet models``
and the parameter-efficiency plot are generated from one table. Building a model from an entry
is :func:`densenet.factory.create_model`'s job.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from densenet.catalog import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from densenet.messages import did_you_mean

PAPER_IMAGENET = "Huang et al. CVPR 2017, Table 3 (single crop)"
PAPER_SVHN = "Huang et al. CVPR 2017, Table 2"
LUA_README = "liuzhuang13/DenseNet README"
TECH_REPORT = "Pleiss et al. 2017 (arXiv 1707.06990)"
TIMM = "timm results-imagenet.csv"


@dataclass(frozen=True)
class Published:
    """One reported result: ``dataset`` (e.g. 'imagenet', 'cifar10+'), top-1 error in %."""

    dataset: str
    top1_error: float
    source: str
    top5_error: float | None = None


@dataclass(frozen=True)
class ModelSpec:
    """How to build a named model and what it expects as input."""

    name: str
    kwargs: dict
    family: str  # 'imagenet' or 'cifar'
    published: tuple[Published, ...] = ()
    published_params: str = ""
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    default_weights: str | None = None
    notes: str = field(default="", compare=False)

    @property
    def num_classes(self) -> int:
        return int(self.kwargs.get("num_classes", 1000 if self.family == "imagenet" else 10))


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _imagenet(name, k, blocks, init, published=(), params="", default_weights=None, **kwargs):
    register(
        ModelSpec(
            name=name,
            kwargs=dict(growth_rate=k, block_config=blocks, num_init_features=init, **kwargs),
            family="imagenet",
            published=tuple(published),
            published_params=params,
            default_weights=default_weights,
        )
    )


def _paper_imagenet(err1: float, err5: float) -> tuple[Published, ...]:
    return (Published("imagenet", err1, PAPER_IMAGENET, err5),)


_imagenet("densenet121", 32, (6, 12, 24, 16), 64, _paper_imagenet(25.02, 7.71), "7,978,856",
          default_weights="densenet121.tv_in1k")  # fmt: skip
_imagenet("densenet169", 32, (6, 12, 32, 32), 64, _paper_imagenet(23.80, 6.85), "14,149,480",
          default_weights="densenet169.tv_in1k")  # fmt: skip
_imagenet("densenet201", 32, (6, 12, 48, 32), 64, _paper_imagenet(22.58, 6.34), "20,013,928",
          default_weights="densenet201.tv_in1k")  # fmt: skip
_imagenet("densenet264", 32, (6, 12, 64, 48), 64, _paper_imagenet(22.15, 6.12), "~33.3M")
_imagenet("densenet161", 48, (6, 12, 36, 24), 96, [Published("imagenet", 22.2, LUA_README)],
          "28,681,000", default_weights="densenet161.tv_in1k")  # fmt: skip
_imagenet("densenet232_k48", 48, (6, 12, 48, 48), 96, [Published("imagenet", 21.2, LUA_README)],
          "~55.6M")  # fmt: skip
_imagenet("densenet264_k48", 48, (6, 12, 64, 48), 96,
          [Published("imagenet", 20.26, TECH_REPORT + " (cosine lr)")], "~72.7M (\"73M\")")  # fmt: skip
_imagenet("densenet264d", 48, (6, 12, 64, 48), 96, (), "72.74M (timm)", stem="deep", stem_width=48)
_imagenet("densenetblur121d", 32, (6, 12, 24, 16), 64,
          [Published("imagenet", round(100 - 76.574, 3), TIMM + " (ra_in1k @224)", round(100 - 93.190, 3))],
          "8.0M (timm)", default_weights="densenetblur121d.ra_in1k", stem="deep", stem_width=32,
          blur="stem")  # fmt: skip


def cifar_block_config(depth: int, bottleneck: bool = True) -> tuple[int, int, int]:
    """Three equal dense blocks for total depth L: (L-4)/3 layers each, or (L-4)/6 with bottleneck."""
    per_layer_convs = 2 if bottleneck else 1
    divisor = 3 * per_layer_convs
    if not isinstance(depth, int) or depth < 4 + divisor or (depth - 4) % divisor:
        valid = ", ".join(str(4 + divisor * n) for n in (1, 2, 6, 16, 31, 41))
        kind = "DenseNet-BC (bottleneck)" if bottleneck else "basic DenseNet"
        raise ValueError(
            f"depth L={depth} does not fit a {kind}: L-4 must be a positive multiple of {divisor} "
            f"(3 blocks x {per_layer_convs} conv per layer), e.g. L = {valid}"
        )
    n = (depth - 4) // divisor
    return (n, n, n)


def cifar_densenet_kwargs(
    depth: int, growth_rate: int, bottleneck: bool = True, compression: float = 0.5
) -> dict:
    """DenseNet arguments of the paper's CIFAR/SVHN rules for depth L and growth rate k."""
    if not isinstance(growth_rate, int) or growth_rate < 1:
        raise ValueError(f"growth_rate must be a positive integer, got {growth_rate!r}")
    return dict(
        growth_rate=growth_rate,
        block_config=cifar_block_config(depth, bottleneck),
        # The paper uses 2k initial channels for BC and 16 for the basic DenseNet.
        num_init_features=2 * growth_rate if bottleneck else 16,
        bn_size=4 if bottleneck else 0,
        compression=compression,
        stem="cifar",
        num_classes=10,
    )


def _cifar(name, depth, k, bottleneck, published, params):
    compression = 0.5 if bottleneck else 1.0
    register(
        ModelSpec(
            name=name,
            kwargs=cifar_densenet_kwargs(depth, k, bottleneck, compression),
            family="cifar",
            published=tuple(
                Published(dataset, err, PAPER_SVHN if dataset == "svhn" else LUA_README)
                for dataset, err in published.items()
            ),
            published_params=params,
            input_size=(3, 32, 32),
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
            crop_pct=1.0,
        )
    )


def _cifar_results(c10, c10p, c100, c100p, svhn) -> dict[str, float]:
    results = {"cifar10": c10, "cifar10+": c10p, "cifar100": c100, "cifar100+": c100p, "svhn": svhn}
    return {k: v for k, v in results.items() if v is not None}


_cifar("densenet40_k12", 40, 12, False, _cifar_results(7.00, 5.24, 27.55, 24.42, 1.79), "1.0M")
_cifar("densenet100_k12", 100, 12, False, _cifar_results(5.77, 4.10, 23.79, 20.20, 1.67), "7.0M")
_cifar("densenet100_k24", 100, 24, False, _cifar_results(5.83, 3.74, 23.42, 19.25, 1.59), "27.2M")
_cifar("densenet_bc100_k12", 100, 12, True, _cifar_results(5.92, 4.51, 24.15, 22.27, 1.76), "0.8M")
_cifar("densenet_bc250_k24", 250, 24, True, _cifar_results(5.19, 3.62, 19.64, 17.60, 1.74), "15.3M")
_cifar("densenet_bc190_k40", 190, 40, True, _cifar_results(None, 3.46, None, 17.18, None), "25.6M")
# `densenet train`'s default model: a small DenseNet-BC (no published result).
_cifar("densenet_bc16_k12", 16, 12, True, {}, "")
# Wide-DenseNet-BC (liuzhuang13 README): C10+ / C100+ errors.
_cifar("densenet_bc40_k36", 40, 36, True, _cifar_results(None, 4.58, None, 22.30, None), "1.5M")
_cifar("densenet_bc40_k48", 40, 48, True, _cifar_results(None, 3.99, None, 20.29, None), "2.7M")
_cifar("densenet_bc40_k60", 40, 60, True, _cifar_results(None, 4.01, None, 19.99, None), "4.3M")


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching a shell-style ``pattern``."""
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; a ``ValueError`` suggesting the nearest names otherwise."""
    base = name.split(".", 1)[0]
    if base in _REGISTRY:
        return _REGISTRY[base]
    hint = did_you_mean(base, _REGISTRY, cutoff=0.5)
    raise ValueError(
        f"unknown model {name!r}{hint} (list them with `densenet models` or densenet.list_models())"
    )
