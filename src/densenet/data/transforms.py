"""Image transforms: per-image training recipes and the evaluation crop (:func:`build_transforms`,
:func:`eval_transform`), and :class:`BatchTransform` for whole uint8 batches on the device."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from densenet.data.images import to_channels

RECIPES = ("none", "standard", "imagenet", "randaugment")
BATCHED_RECIPES = ("none", "standard")  # the recipes BatchTransform runs on whole batches
INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


class ToChannels:
    """Transform form of :func:`to_channels` (a class, so DataLoader workers can pickle it).

    Non-PIL inputs (uint8 tensors of the in-memory datasets, already converted) pass through.
    """

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, image: Any) -> Any:
        return to_channels(image, self.channels) if isinstance(image, Image.Image) else image


class Lighting:
    """AlexNet-style PCA lighting noise (fb.resnet.torch), on a float ``(3, H, W)`` tensor in [0, 1]."""

    EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
    EIGVEC = torch.tensor(
        [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
    )

    def __init__(self, alphastd: float = 0.1) -> None:
        self.alphastd = alphastd

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0 or image.shape[0] != 3:
            return image
        alpha = torch.randn(3) * self.alphastd
        rgb = self.EIGVEC @ (alpha * self.EIGVAL)
        return image + rgb.view(3, 1, 1).to(image)


def build_transforms(
    recipe: str,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    input_size: int | Sequence[int],
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
) -> v2.Compose:
    """Per-image transform: PIL image or uint8 ``(C, H, W)`` -> normalized float ``(C, S, S)``.

    Recipes (training): ``none`` (paper C10/C100/SVHN), ``standard`` (4-px zero-pad random crop
    and flip, the paper's "+"), ``imagenet`` (random-resized crop, flip, color jitter 0.4, PCA
    lighting 0.1 as fb.resnet.torch), ``randaugment`` (random-resized crop, flip, RandAugment
    2 ops magnitude 9 as timm's ``ra``). Eval (``train=False``): resize the short side to
    ``S / crop_pct``, then center crop ``S``.
    """
    if recipe not in RECIPES:
        raise ValueError(
            f"unknown augmentation recipe {recipe!r}; choose one of {', '.join(RECIPES)}"
        )
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}"
        )
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    size = int(input_size[-1]) if isinstance(input_size, Sequence) else int(input_size)
    mode = INTERPOLATIONS[interpolation]
    steps: list = [ToChannels(len(mean)), v2.ToImage()]
    if train and recipe in ("imagenet", "randaugment"):
        steps += [
            v2.RandomResizedCrop(size, interpolation=mode, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if recipe == "randaugment":
            steps.append(v2.RandAugment(num_ops=2, magnitude=9, interpolation=mode))
        else:
            steps.append(v2.ColorJitter(0.4, 0.4, 0.4))
    else:
        steps += [
            v2.Resize(math.floor(size / crop_pct), interpolation=mode, antialias=True),
            v2.CenterCrop(size),
        ]
        if train and recipe == "standard":
            steps += [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if train and recipe == "imagenet":
        steps.append(Lighting(0.1))
    steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


def eval_transform(
    input_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
    ten_crop: bool = False,
) -> v2.Compose:
    """PIL image -> normalized float tensor ``(C, S, S)`` (or ``(10, C, S, S)`` with ``ten_crop``).

    Converts the image to ``len(mean)`` channels by :func:`~densenet.data.images.to_channels`'s rule (the
    one training uses: every PIL mode, alpha on white, 16-bit and float scaled), resizes the short
    side to ``S / crop_pct`` and takes the center crop of side ``S`` (timm's convention; 224 at
    0.875 gives the usual resize 256), or the four corners, the center and their horizontal flips
    with ``ten_crop`` (fb.resnet.torch's TenCrop).
    """
    single = build_transforms("none", False, mean, std, input_size, crop_pct, interpolation)
    if not ten_crop:
        return single
    size = int(input_size[-1]) if isinstance(input_size, Sequence) else int(input_size)
    # The single-crop pipeline with TenCrop in place of CenterCrop; later steps map over crops.
    steps = [v2.TenCrop(size) if isinstance(t, v2.CenterCrop) else t for t in single.transforms]
    return v2.Compose([*steps, _StackCrops()])


class _StackCrops:
    """The tuple of crops -> one ``(crops, C, S, S)`` tensor."""

    def __call__(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(crops))


class BatchTransform:
    """Batched preprocessing of uint8 ``(N, C, H, W)`` -> normalized float, on the batch's device.

    ``recipe`` 'standard' adds a random crop of the 4-px zero-padded image and a horizontal flip
    per image, drawn from the global torch RNG of that device (saved with checkpoints, so resumed
    runs draw the same). Padding is zero in pixel space, like torchvision's RandomCrop.
    """

    def __init__(
        self, recipe: str, train: bool, mean: Sequence[float], std: Sequence[float], pad: int = 4
    ) -> None:
        if recipe not in BATCHED_RECIPES:
            raise ValueError(f"batched augmentation supports 'none' and 'standard', not {recipe!r}")
        self.augment = train and recipe == "standard"
        self.pad = pad
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images  # already preprocessed per image
        x = images.float().mul_(1 / 255)  # as v2.ToDtype(scale=True): the per-image path's values
        if self.augment:
            x = self._crop_flip(x)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return x.sub_(mean).div_(std)

    def _crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), device=x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), device=x.device)
        flip = torch.rand(n, device=x.device) < 0.5
        rows = (dy[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = torch.arange(w, device=x.device).expand(n, w)
        cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
        rows = rows.expand(n, x.shape[1], h, w + 2 * p)
        out = padded.gather(2, rows)
        return out.gather(3, cols.view(n, 1, 1, w).expand(n, x.shape[1], h, w))
