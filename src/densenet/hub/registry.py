"""The registry of published weights: where each file is, its hash, eval transform and accuracy.

Like torchvision's ``Weights`` enums: an entry (:class:`Weights`) names the file's URL, the
SHA256 it must match, its license, the eval-time transform its reported accuracy was measured
with, and that accuracy with its source. Hashes: the file's full SHA256 where it is published,
else the prefix in its file name (torchvision's convention, the only part ``torch.hub``
checks); timm's Hugging Face files publish none. Imports no torch: ``densenet models --weights``
lists the entries at once.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from densenet.catalog import IMAGENET_MEAN, IMAGENET_STD
from densenet.messages import did_you_mean


@dataclass(frozen=True)
class Weights:
    """One published set of weights, like a member of torchvision's ``Weights`` enums.

    ``sha256`` is the file's full hex digest, or the prefix published in its file name when the
    full digest is not (``None`` when nothing is published). ``top1``/``top5`` are accuracies in %
    on the ImageNet-1k validation set as reported by ``metrics_source``, with this entry's eval
    transform (``input_size``, ``crop_pct``, ``interpolation``).
    """

    tag: str
    url: str
    sha256: str | None
    license: str
    top1: float | None
    top5: float | None
    metrics_source: str
    file_name: str
    num_classes: int = 1000
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    file_size: int | None = None  # bytes, where published
    notes: str = field(default="", compare=False)

    @property
    def model_name(self) -> str:
        return self.tag.split(".", 1)[0]

    @property
    def hash_checked(self) -> str:
        if not self.sha256:
            return "none published (only completeness and format are checked)"
        return "full SHA256" if len(self.sha256) == 64 else f"SHA256 prefix {self.sha256!r}"

    def cfg(self) -> dict:
        """The eval-time config models built with these weights carry as ``pretrained_cfg``."""
        return dict(
            tag=self.tag,
            mean=self.mean,
            std=self.std,
            input_size=self.input_size,
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
            num_classes=self.num_classes,
        )


WEIGHTS: dict[str, Weights] = {}

TV_LICENSE = "BSD-3-Clause (torchvision; ported from the authors' LuaTorch models)"
TV_SOURCE = "torchvision {cls}.IMAGENET1K_V1 meta (resize 256 bilinear, center crop 224)"
TIMM_SOURCE = "timm results-imagenet.csv"


def _register(weights: Weights) -> None:
    if weights.tag in WEIGHTS:
        raise ValueError(f"weights {weights.tag!r} registered twice")
    WEIGHTS[weights.tag] = weights


def _torchvision(model: str, sha256: str, top1: float, top5: float, size: int | None) -> None:
    # torchvision names each file after the first 8 hex digits of its SHA256
    file_name = f"{model}-{sha256[:8]}.pth"
    url = f"https://download.pytorch.org/models/{file_name}"
    cls = f"DenseNet{model.removeprefix('densenet')}_Weights"
    _register(
        Weights(
            tag=f"{model}.tv_in1k",
            url=url,
            sha256=sha256,
            license=TV_LICENSE,
            top1=top1,
            top5=top5,
            metrics_source=TV_SOURCE.format(cls=cls),
            file_name=file_name,
            interpolation="bilinear",
            file_size=size,
        )
    )


def _timm(tag: str, top1: float, top5: float | None, notes: str) -> None:
    # timm serves these from the Hugging Face hub; the file names are all the same there.
    _register(
        Weights(
            tag=tag,
            url=f"https://huggingface.co/timm/{tag}/resolve/main/model.safetensors",
            sha256=None,
            license="Apache-2.0 (timm)",
            top1=top1,
            top5=top5,
            metrics_source=f"{TIMM_SOURCE} (@224, crop 0.875, bicubic)",
            file_name=f"{tag}.safetensors",
            notes=notes,
        )
    )


# Full SHA256s published alongside torchvision's files (for the others: the file-name prefix).
_DENSENET121_SHA256 = "a639ec97d7c33b07ae66f0b5fb7d0192f95a3b11b7576c66c0126c2a727c4395"
_DENSENET161_SHA256 = "8d451a50bad6b9a83f477126c443716882a17af26e94d338154b058fb2dfd359"

_torchvision("densenet121", _DENSENET121_SHA256, 74.434, 91.972, 32342954)
_torchvision("densenet161", _DENSENET161_SHA256, 77.138, 93.560, None)
_torchvision("densenet169", "b2777c0a", 75.600, 92.806, None)
_torchvision("densenet201", "c1103571", 76.896, 93.370, None)
_timm("densenet121.ra_in1k", 75.574, None, "RandAugment recipe; 76.486 top-1 @288, crop 0.95")
_timm("densenetblur121d.ra_in1k", 76.574, 93.190, "77.320 top-1 @288, crop 0.95")


def list_weights(pattern: str = "*") -> list[str]:
    """Sorted registry tags matching a shell-style ``pattern`` (e.g. ``"densenet121.*"``)."""
    return sorted(tag for tag in WEIGHTS if fnmatch.fnmatch(tag, pattern))


def get_weights(tag: str) -> Weights:
    """The registry entry of ``tag``; a ``ValueError`` suggesting the nearest tags otherwise."""
    if tag in WEIGHTS:
        return WEIGHTS[tag]
    hint = did_you_mean(tag, WEIGHTS, cutoff=0.5)
    raise ValueError(f"unknown weights {tag!r}{hint} (densenet.list_weights() lists all)")
