"""Decode photos into upright RGB images and letterbox them to a square.

``load_image`` accepts whatever a photo arrives as (bytes from an image store, a file path, an
already-open PIL image) and always returns a fully decoded RGB image:
- EXIF orientation is applied, so phone photos are upright;
- transparency is composited onto white: cut-out product shots are made to be shown on a white page,
  and white keeps the object's silhouette where black would merge with dark products;
- palette, grey, CMYK and 16-bit images are converted (16-bit values are scaled, not clipped);
- images with more than ``max_pixels`` pixels are refused before decoding (decompression-bomb guard).
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CorruptImageError, DataConfigError, ImageNotFoundError, ImageTooLargeError

logger = logging.getLogger(__name__)

#: Default pixel limit: 40 megapixels is above any phone camera, far below a decompression bomb.
DEFAULT_MAX_PIXELS = 40_000_000
_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

ImageSource = bytes | bytearray | str | Path | Image.Image


def _describe(source: ImageSource, name: str | None) -> str:
    """How error messages name the image: the caller's name, else the path, else the byte count."""
    if name is not None:
        return name
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, Image.Image):
        return f"<{source.mode} image {source.width}x{source.height}>"
    return f"<{len(source):,} bytes>"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency composited onto white, 16-bit scaled to 8-bit."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        # PIL's convert("L") clips 16-bit values at 255 instead of scaling them.
        values = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode ``source`` into an upright RGB image (see the module docstring).

    ``name`` is how errors refer to the image (e.g. its id); by default the path or the byte count.
    Raises ``CorruptImageError`` when it does not decode and ``ImageTooLargeError`` above ``max_pixels``.
    """
    described = _describe(source, name)
    try:
        if isinstance(source, Image.Image):
            img = source
        else:
            handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
            with warnings.catch_warnings():
                # We apply our own, lower limit just below; PIL's warning would only be noise.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(handle)
        pixels = img.width * img.height
        if pixels > max_pixels:
            raise ImageTooLargeError(described, pixels, max_pixels)
        img.load()
    except Image.DecompressionBombError as exc:
        # PIL refused it while reading the header, before we could count its pixels.
        raise ImageTooLargeError(described, None, max_pixels) from exc
    except FileNotFoundError as exc:
        path = Path(source)  # type: ignore[arg-type]  # only paths raise FileNotFoundError
        raise ImageNotFoundError(path.name, str(path.parent)) from exc
    except UnidentifiedImageError as exc:
        # PIL's own message names its internal buffer object, which means nothing to the caller.
        raise CorruptImageError(described, "not a recognised image format (JPEG, PNG, WebP, ...)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(described, str(exc) or type(exc).__name__) from exc
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception as exc:  # any EXIF parsing failure: the pixels themselves are fine
        logger.warning("image %s: ignoring unreadable EXIF orientation (%s)", described, exc)
        upright = img
    rgb = _to_rgb(upright)
    # Never hand back the caller's own object: callers may modify the result.
    return rgb.copy() if rgb is source else rgb


def letterbox(img: Image.Image, size: int, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Scale ``img`` so its longer side is ``size`` (aspect kept) and centre it on a ``size`` x ``size`` square.

    The padding is ``fill``: black by default, like the users' photos. Non-RGB images go through
    ``load_image`` first.
    """
    if size < 1:
        raise DataConfigError(f"letterbox size must be a positive number of pixels, not {size}")
    if img.mode != "RGB":
        img = load_image(img)
    scale = size / max(img.width, img.height)
    # At least one pixel: a 1000x1 strip must not vanish.
    width, height = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    resized = img if (width, height) == img.size else img.resize((width, height), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(resized, ((size - width) // 2, (size - height) // 2))
    return canvas
