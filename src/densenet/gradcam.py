"""Grad-CAM (Selvaraju et al. 2017) for DenseNets, safe with in-place ReLUs.

The map of one image for one output (a class of a softmax model, a label of a multi-label
model's sigmoid outputs) is ``ReLU(sum_c w_c * A_c)`` with ``w_c`` the spatial mean of
``d logit / d A_c`` over the target layer's activation ``A`` ``(C, h, w)``; it is upsampled
bilinearly to the input size and divided by its maximum, so it lies in [0, 1] (all zeros when
no position votes for the output).

The default layer is ``features``: the last dense block's output after norm5 and relu5,
``(num_features, H/32, W/32)`` for ImageNet stems (``H/4`` for CIFAR stems), the map the
classifier pools; any module name of ``model.named_modules()`` can be given instead.

Why not ``register_full_backward_hook``: DenseNets apply ReLUs in place (our ``nn.ReLU(inplace=
True)`` modules, torchvision's ``F.relu(features, inplace=True)`` in ``forward``), which
backward module hooks refuse (pytorch/vision#4164). Here a forward hook replaces the layer's
output with a copy of a detached leaf ``A``; in-place ops downstream modify the copy, and
``torch.autograd.grad(logit, A)`` reads the gradient without touching any parameter's
``.grad``. The hook is removed before returning, and the model's mode is restored.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from torch import nn

from densenet.io import atomic_write
from densenet.multilabel import TASKS

DEFAULT_LAYER = "features"


class GradCam(NamedTuple):
    """``cam``: ``(H, W)`` float32 in [0, 1] at the input's size; ``index``: the explained
    class or label; ``probability``: its softmax (multiclass) or sigmoid (multilabel) value."""

    cam: torch.Tensor
    index: int
    probability: float


def _find_layer(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if not layer or layer not in modules:
        examples = ", ".join(name for name in modules if name.count(".") <= 1 and name)
        raise ValueError(f"no layer {layer!r} in this model; choose one of: {examples}, ...")
    return modules[layer]


def _single_image(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(
            f"Grad-CAM explains one image, (C, H, W) or (1, C, H, W); got {tuple(x.shape)}"
        )
    return x


class _Capture:
    """Forward hook: keeps the layer's output as a leaf ``activation`` requiring grad and
    hands the network a copy, so the leaf survives in-place ops that follow."""

    def __init__(self) -> None:
        self.activation: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: object, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise ValueError(
                f"Grad-CAM needs a layer whose output is one tensor, not {type(output).__name__}"
            )
        if self.activation is not None:
            raise ValueError(
                "the Grad-CAM layer ran twice in one forward pass (a module reused in the "
                "network); choose a layer that runs once"
            )
        self.activation = output.detach().requires_grad_(True)
        return self.activation.clone()


def _forward_with_capture(
    model: nn.Module, x: torch.Tensor, layer: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (1, K), activation (1, C, h, w))`` with the activation a leaf of the graph."""
    capture = _Capture()
    handle = _find_layer(model, layer).register_forward_hook(capture)
    was_training = model.training
    try:
        model.eval()
        logits = model(x)
    finally:
        handle.remove()
        model.train(was_training)
    if capture.activation is None:
        raise ValueError(
            f"layer {layer!r} did not run in the forward pass (its model computes it without "
            f"calling it as a module); choose a block or '{DEFAULT_LAYER}'"
        )
    if capture.activation.dim() != 4:
        raise ValueError(
            f"layer {layer!r} gives shape {tuple(capture.activation.shape)}; Grad-CAM needs a "
            "(1, C, h, w) feature map: choose a convolutional layer"
        )
    return logits, capture.activation


def _probability(logits: torch.Tensor, index: int, task: str) -> float:
    if task == "multilabel":
        return float(torch.sigmoid(logits[index]))
    return float(logits.softmax(0)[index])


@torch.enable_grad()  # also under a caller's torch.no_grad() (a figure, an inference loop)
def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    index: int | None = None,
    task: str = "multiclass",
    layer: str = DEFAULT_LAYER,
) -> GradCam:
    """Grad-CAM of one normalized image ``x`` ``(C, H, W)`` or ``(1, C, H, W)``.

    ``index``: the class (``task="multiclass"``) or label (``"multilabel"``) to explain,
    default the highest logit. The gradient is taken of the logit, not of the probability:
    sigmoid and softmax would only rescale (or, for softmax, mix in the other classes).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    x = _single_image(x)
    logits, activation = _forward_with_capture(model, x, layer)
    logits = logits.reshape(-1)
    if index is None:
        index = int(logits.argmax())
    if not 0 <= index < logits.numel():
        raise ValueError(f"index {index} is out of range: the model has {logits.numel()} outputs")
    try:
        (gradient,) = torch.autograd.grad(logits[index], activation)
    except RuntimeError as error:
        raise ValueError(
            f"the output does not depend on layer {layer!r} through autograd ({error}); "
            f"choose a layer outside a recomputed (checkpointed) part, e.g. '{DEFAULT_LAYER}'"
        ) from None
    weights = gradient[0].mean(dim=(1, 2))  # (C,)
    cam = torch.relu(torch.einsum("c,chw->hw", weights, activation[0].detach()))
    cam = F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
    cam = cam[0, 0]
    peak = cam.max()
    cam = cam / peak if peak > 0 else torch.zeros_like(cam)
    return GradCam(cam.float().cpu(), index, _probability(logits.detach(), index, task))


# --- pictures -----------------------------------------------------------------------------------
def _to_rgb_array(image: Image.Image | torch.Tensor) -> np.ndarray:
    """``(H, W, 3)`` float in [0, 1] from a PIL image (any mode) or a ``(C, H, W)`` tensor in
    [0, 1] (1 or 3 channels; others show their first channel)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    if image.dim() != 3:
        raise ValueError(f"the image must be (C, H, W), got {tuple(image.shape)}")
    pixels = image.detach().float().cpu().clamp(0, 1)
    if pixels.shape[0] != 3:
        pixels = pixels[:1].expand(3, -1, -1)
    return pixels.permute(1, 2, 0).numpy()


def cam_overlay(
    image: Image.Image | torch.Tensor, cam: torch.Tensor, alpha: float = 0.5
) -> Image.Image:
    """RGB image: ``image`` blended with the ``cam`` ``(h, w)`` in [0, 1] as a 'jet' heat map
    (``alpha`` = heat map weight); the map is resized to the image."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = _to_rgb_array(image)
    height, width = base.shape[:2]
    if tuple(cam.shape) != (height, width):
        cam = F.interpolate(cam[None, None].float(), size=(height, width), mode="bilinear")[0, 0]
    heat = colormaps["jet"](cam.clamp(0, 1).cpu().numpy())[..., :3]
    blended = (1 - alpha) * base + alpha * heat
    return Image.fromarray(np.round(blended * 255).astype(np.uint8))


def save_cam_overlay(
    image: Image.Image | torch.Tensor, cam: torch.Tensor, path: str | Path, alpha: float = 0.5
) -> Path:
    """Write :func:`cam_overlay` as a PNG at ``path`` (atomically); returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: Grad-CAM overlays are written as PNG; give a name ending .png")
    overlay = cam_overlay(image, cam, alpha)
    return atomic_write(path, lambda f: overlay.save(f, format="PNG"))
