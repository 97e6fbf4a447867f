"""Image files decoded by one rule: :func:`load_image` and :func:`to_channels`.

Training, evaluation, prediction and visualization decode every image file here: EXIF orientation
applied, transparency composited on white, 16-bit and float images scaled, PIL's
decompression-bomb limit a one-line error (:class:`BadImageError`).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from densenet.messages import count, notice

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# Transparent pixels are composited onto white: the background browsers, viewers and documents show
# them on, so a cut-out photo or a logo reaches the model as it looks to the person who made it. The
# color stored under alpha 0 is arbitrary (encoders keep anything there), so it is never used.
ALPHA_BACKGROUND = (255, 255, 255)
# Float images hold [0, 1] (torchvision's range for float images); half an 8-bit step of rounding
# slack outside it is clipped, anything further is an error.
FLOAT_SLACK = 0.5 / 255
SKIP_HINT = "remove it or pass --skip-bad-images"
ORIENTATION_TAG = 0x0112  # EXIF "Orientation"; 1 is upright
# 8- or 12-bit data saved in a 16-bit file stays below this; scaled as 16-bit it is nearly black.
LOW_BIT_DEPTH_LIMIT = 4096
DARK_FILES_NAMED = 3  # files named one by one; after them only a count, at 10, 100, 1000, ...
_dark_files: set[str] = set()  # the files already noticed (each is decoded every epoch)


class BadImageError(ValueError):
    """An unreadable image file; its message is one line, also when a loader worker raised it."""

    def __init__(self, message: str) -> None:
        # DataLoader re-raises a worker's error as ``type(error)(text with the worker's
        # traceback)``; the last line of that text is "...BadImageError: <our message>".
        if "Original Traceback" in message:
            message = message.strip().splitlines()[-1].split("BadImageError: ", 1)[-1]
        super().__init__(message)


def to_channels(image: Image.Image, channels: int | None = None) -> Image.Image:
    """``image`` converted by the one rule every path uses: 8-bit ``'L'`` or ``'RGB'``.

    The rule, for every PIL mode:

    - EXIF orientation is applied (``ImageOps.exif_transpose``): pixels stand as a viewer shows them.
    - Transparency (an alpha band: ``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``; or a PNG ``tRNS``
      color or palette alpha: ``P``, ``L``, ``RGB`` with ``info["transparency"]``) is composited
      onto white, :data:`ALPHA_BACKGROUND`.
    - Integer gray (``I;16``, ``I;16B``, ``I``) is read as 16-bit: ``[0, 65535]`` maps to
      ``[0, 255]`` as ``round(v / 257)``; a value outside ``[0, 65535]`` is an error.
    - Float gray (``F``) must hold ``[0, 1]``: it maps to ``round(255 v)``; NaN, infinity or a value
      further than :data:`FLOAT_SLACK` outside ``[0, 1]`` is an error.
    - ``1`` becomes 0/255 gray; ``P``, ``CMYK``, ``YCbCr``, ``RGBX`` become RGB by PIL's conversion.
    - ``channels`` 1 takes PIL's luma of RGB (ITU-R 601-2), 3 repeats gray; None keeps gray
      sources ``'L'`` and color sources ``'RGB'``.

    Raises ``ValueError`` for an out-of-range image or a mode PIL cannot convert to RGB.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"images can be converted to 1 or 3 channels, not {channels}")
    if image.getexif().get(ORIENTATION_TAG, 1) != 1:  # exif_transpose copies even when upright
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I"):  # 'I' and the 16-bit 'I;16', 'I;16B', 'I;16L', 'I;16N'
        pixels = np.asarray(image).astype(np.int64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError(
                f"integer image (mode {mode}) with values from {pixels.min()} to {pixels.max()}; "
                "integer images are read as 16-bit, 0 to 65535 (save it as 8- or 16-bit)"
            )
        image = Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8))
    elif mode == "F":
        pixels = np.asarray(image, dtype=np.float32)
        if not np.isfinite(pixels).all():
            raise ValueError("floating-point image holds NaN or infinite values")
        low, high = float(pixels.min()), float(pixels.max())
        if low < -FLOAT_SLACK or high > 1 + FLOAT_SLACK:
            raise ValueError(
                f"floating-point image with values from {low:g} to {high:g}; float images must "
                "hold 0 to 1 (scale it, or save it as 8- or 16-bit)"
            )
        image = Image.fromarray(np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    elif "A" in mode or "a" in mode or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (*ALPHA_BACKGROUND, 255))
        flat = Image.alpha_composite(background, image.convert("RGBA"))
        image = flat.convert("L" if mode in ("L", "LA", "La") else "RGB")
    elif mode not in ("L", "RGB"):
        image = image.convert("L" if mode == "1" else "RGB")
    wanted = {1: "L", 3: "RGB"}.get(channels, image.mode)
    return image if image.mode == wanted else image.convert(wanted)


# Raises PIL's decompression-bomb limit (pixels) for trusted huge images, in every command.
PIXEL_LIMIT_ENV = "DENSENET_MAX_IMAGE_PIXELS"


def _apply_pixel_limit() -> None:
    """Set PIL's limit from :data:`PIXEL_LIMIT_ENV` when the environment gives one."""
    value = os.environ.get(PIXEL_LIMIT_ENV)
    if not value:
        return
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{PIXEL_LIMIT_ENV}={value!r} is not a number of pixels (1 or more)")
    Image.MAX_IMAGE_PIXELS = int(value)


def load_image(
    source: str | Path | bytes, name: str | None = None, hint: str = "", channels: int | None = None
) -> Image.Image:
    """Decode one image file as training, evaluation, prediction and visualization all do.

    ``source`` is a path or the file's bytes. Returns an 8-bit ``'L'`` or ``'RGB'`` image made by
    :func:`to_channels`'s rule (``channels`` 1 or 3, default: gray stays gray). A file that does not decode, is larger than PIL's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``; PIL itself only warns up to twice
    it) or breaks the rule raises :class:`BadImageError`, one line naming the file (``name``,
    default the path) and ending with ``hint``.
    """
    label = name or str(source)
    _apply_pixel_limit()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                image.load()
                _note_low_bit_depth(image, label)
                return to_channels(image, channels)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(pixels[1]):,} pixels" if pixels else "too many pixels"
        limit = f"{Image.MAX_IMAGE_PIXELS:,}" if Image.MAX_IMAGE_PIXELS else "set"
        message = (
            f"{label}: {size}, over PIL's decompression-bomb limit of {limit} "
            f"(PIL.Image.MAX_IMAGE_PIXELS); shrink the image, or, if you trust it, raise the "
            f"limit: {PIXEL_LIMIT_ENV}=N in the environment"
        )
    except UnidentifiedImageError:
        message = f"{label} is not a readable image (unknown or unsupported format)"
    except (OSError, SyntaxError, EOFError) as error:  # truncated or damaged
        message = f"{label} is not a readable image ({error})"
    except ValueError as error:  # the conversion rule's range checks, or an unconvertible mode
        message = f"{label}: {error}"
    raise BadImageError(message + (f"; {hint}" if hint else ""))


def _note_low_bit_depth(image: Image.Image, label: str) -> None:
    """A notice naming an integer (16-bit) image whose values all stay below
    :data:`LOW_BIT_DEPTH_LIMIT`: the 0-65535 rule keeps it, but it reaches the model nearly black.
    Once per file; the first :data:`DARK_FILES_NAMED` files by name, then a count."""
    if not image.mode.startswith("I") or label in _dark_files:
        return
    pixels = np.asarray(image)
    low, high = int(pixels.min()), int(pixels.max())
    if low < 0 or not 0 < high < LOW_BIT_DEPTH_LIMIT:  # out of range (an error), blank, or deep
        return
    _dark_files.add(label)
    seen = len(_dark_files)
    if seen <= DARK_FILES_NAMED:
        notice(
            f"{label}: 16-bit image whose values stay below {LOW_BIT_DEPTH_LIMIT} (max {high}): "
            "scaled as 16-bit (0-65535), so it is dark; if it holds 8- or 12-bit data, rescale "
            "it to 0-65535 or save it as 8-bit"
        )
    elif str(seen).rstrip("0") == "1":  # 10, 100, 1000, ...
        notice(
            f"{count(seen, '16-bit image')} so far with values below {LOW_BIT_DEPTH_LIMIT}, "
            f"read dark (the first {DARK_FILES_NAMED} are named above)"
        )
