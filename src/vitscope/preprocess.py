"""Users' digit images -> what an MNIST model expects, the way MNIST itself was made.

MNIST digits are white ink on black, the ink's bounding box scaled (keeping aspect, antialiased) so its
longest side is 20 px, then pasted into 28x28 with the ink's centre of mass on the centre pixel. A photo,
a paint-program drawing or a font rendering is none of that, and a model fed it raw guesses. This module is
the one place that bridges the two; `predict`, the Python API and the web page all call it:

    read_image(path) / decode_image(bytes)   -> a checked, decoded, upright PIL image (or ImageRejected)
    mnist_style(image, size)                 -> uint8 (size, size), white ink on black, centred
    data.normalize                           -> the model's input scale

Untrusted files are checked before decoding: at most 20 MB, 8192 px a side and 40 megapixels (read from
the header, so a decompression bomb is refused before a pixel is decoded), and only the formats a user's
digit comes in (Pillow can open dozens, some through external programs).
"""
from __future__ import annotations

import io
import stat
import struct
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_SIDE = 8192
MAX_PIXELS = 40_000_000
# JPEG includes the multi-picture JPEGs (MPO) many phone cameras write: Pillow's JPEG opener returns them.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
FORMAT_NAMES = "PNG, JPEG, BMP, GIF, WebP or TIFF"

# Opening (reading the header) takes turns: each open swaps the process's warning filters (see open_header).
_open_lock = threading.Lock()

# Pixels that differ from the background by less than this share of the strongest ink are noise
# (paper texture, JPEG ringing, a shadow): they neither extend the ink's bounding box nor count as ink.
NOISE_FRACTION = 0.2
# An image whose strongest ink differs from the background by less than this (of full scale) has none.
MIN_CONTRAST = 0.1
# MNIST's median stroke width in its 28x28 images, by `stroke_width` (measured on its training set;
# the middle 80% lie between 1.8 and 3.3 px).
MNIST_STROKE_WIDTH = 2.4
# Strokes are thinned or thickened at this many times the final resolution.
WORK_SCALE = 4
# Images beyond this many pixels are box-averaged down first: a digit in them stays far above 20 px, and
# the float work below stays small for a 40-megapixel photo.
WORK_PIXELS = 4_000_000


class ImageRejected(ValueError):
    """One image that cannot be used, with the reason a user can act on; collected per file, not fatal."""


def read_image(path: str | Path) -> Image.Image:
    """A user's image file, checked and decoded (first frame, EXIF orientation applied)."""
    path = Path(path)
    try:
        status = path.stat()
        if stat.S_ISDIR(status.st_mode):
            raise ImageRejected("is a directory, not an image file")
        if not stat.S_ISREG(status.st_mode):  # a pipe or a device would block the read, or never end
            raise ImageRejected("is not a regular file")
        size = status.st_size
        if size > MAX_FILE_BYTES:
            raise ImageRejected(f"file is {size / 2**20:.1f} MB, over the {MAX_FILE_BYTES // 2**20} MB limit")
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ImageRejected("no such file") from None
    except OSError as e:
        raise ImageRejected(f"cannot read file: {e.strerror or e}") from None
    return decode_image(data)


def decode_image(data: bytes) -> Image.Image:
    """Image bytes (a file's or an upload's) -> a decoded PIL image, first frame, upright."""
    if not data:
        raise ImageRejected("empty file")
    if len(data) > MAX_FILE_BYTES:
        raise ImageRejected(f"file is over the {MAX_FILE_BYTES // 2**20} MB limit")
    try:
        image = open_header(data)
        width, height = image.size  # from the header: nothing decoded yet
        if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
            raise ImageRejected(f"image is {width}x{height} px, over the limit of {MAX_SIDE} px a side "
                                f"and {MAX_PIXELS // 1_000_000} megapixels")
        if width < 1 or height < 1:
            raise ImageRejected(f"image is {width}x{height} px: it has no pixels")
        image.seek(0)  # an animated GIF or a multi-page TIFF: the first frame
        image.load()
        return ImageOps.exif_transpose(image)
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected(f"not an image, or not a supported format ({FORMAT_NAMES})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(f"image is over the limit of {MAX_PIXELS // 1_000_000} megapixels") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        # Pillow reports truncated or corrupt data through all of these, depending on the format.
        raise ImageRejected(f"truncated or corrupt image data ({str(e).splitlines()[0] or type(e).__name__})") from None


def open_header(data: bytes) -> Image.Image:
    """Image.open: the format and size from the header, no pixels decoded; only FORMATS.

    Pillow's own bomb guard reads its process-wide Image.MAX_IMAGE_PIXELS (89 megapixels unless the program
    changed it) and warns above it (an error at twice that). vitscope leaves that setting, and the process's
    warning filters, as the program has them: its own limits are checked from the size this returns, and
    Pillow's warning becomes an exception for this call only, so a bomb is never decoded and never prints."""
    with _open_lock, warnings.catch_warnings():  # catch_warnings swaps the process's filter list: one at a time
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.init()  # every format plugin registered, as Image.open(formats=...) expects of the named ones
        return Image.open(io.BytesIO(data), formats=FORMATS)


def mnist_style(image: Image.Image, size: int = 28, normalize_stroke: bool = True) -> np.ndarray:
    """A digit image of any size, mode, colour and polarity -> uint8 (size, size), white ink on black:
    the ink cropped, its longest side scaled to 20/28 of `size` keeping aspect (antialiased), pasted so its
    centre of mass falls on the centre pixel, as MNIST was made. With `normalize_stroke`, the strokes of a
    digit at least as large as the box are also thinned or thickened to MNIST's typical width (a marker or a
    hairline pen is not what it learned)."""
    box = round(size * 20 / 28)
    ink = _crop_to_ink(ink_of(image))  # (h, w) floats, 0 = background, 1 = the strongest ink
    # A digit smaller than the box is scaled up: its strokes were a pixel or two, and a width measured after
    # the upscale is the resampling's blur, not the pen (on 12 px type, adjusting it cost 1.7 points).
    if normalize_stroke and max(ink.shape) >= box:
        # At WORK_SCALE x the final size, so a fraction of a final pixel is whole pixels of erosion.
        ink = _scale_longest_side(ink, box * WORK_SCALE)
        # Eroding by r per side thins a stroke w to w - 2r but also shrinks the ink's box L to L - 2r, which is
        # then scaled back up to `box`: solve (w - 2r) / (L - 2r) = target / box for r (work pixels).
        target = MNIST_STROKE_WIDTH * size / 28 / box
        radius = round((stroke_width(ink) - target * box * WORK_SCALE) / (2 * (1 - target)))
        adjusted = _morphology(ink, abs(radius), erode=radius > 0) if radius else ink
        if adjusted.any():  # a mean width can overstate a soft, hazy stroke: never erode the digit away
            ink = _crop_to_ink(adjusted)
    digit = _scale_longest_side(ink, box)
    # MNIST's strokes are full white at their core; a thin stroke scaled down is a faint grey, so the
    # strongest pixel is brought back to full white.
    digit = digit / digit.max()
    total = digit.sum()
    com_row = (digit.sum(1) * np.arange(digit.shape[0])).sum() / total
    com_col = (digit.sum(0) * np.arange(digit.shape[1])).sum() / total
    # MNIST shifted by whole pixels so the centre of mass lands on (size/2, size/2) in pixel-index terms
    # (measured on its training set: mean 14.00, spread that of rounding). Kept inside the frame, so ink is
    # never cut off for a lopsided shape.
    top = int(np.clip(round(size / 2 - com_row), 0, size - digit.shape[0]))
    left = int(np.clip(round(size / 2 - com_col), 0, size - digit.shape[1]))
    out = np.zeros((size, size), np.float32)
    out[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    return np.round(out * 255).astype(np.uint8)


def stroke_width(ink: np.ndarray) -> float:
    """Mean stroke width in pixels: a stroke of width w and length L has area wL and outline 2L, so
    w = 2 * area / outline, the outline measured as the total gradient magnitude (works on soft edges)."""
    padded = np.pad(ink.astype(np.float64), ((0, 1), (0, 1)))
    across, down = np.diff(padded, axis=1)[:-1], np.diff(padded, axis=0)[:, :-1]
    return 2 * ink.sum() / max(np.hypot(across, down).sum(), 1e-9)


def _crop_to_ink(ink: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(ink)
    return ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _scale_longest_side(ink: np.ndarray, side: int) -> np.ndarray:
    height, width = ink.shape
    scale = side / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Lanczos widens its kernel when shrinking, so this antialiases; it rings slightly, hence the clip.
    resized = Image.fromarray(ink.astype(np.float32), "F").resize(new_size, Image.Resampling.LANCZOS)
    return np.asarray(resized).clip(0, 1)


def _morphology(ink: np.ndarray, radius: int, erode: bool) -> np.ndarray:
    """Grey-level erosion (min) or dilation (max) over a disk of `radius` pixels; outside is background."""
    height, width = ink.shape
    padded = np.pad(ink, radius)
    out = padded[radius:radius + height, radius:radius + width].copy()
    combine = np.minimum if erode else np.maximum
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                combine(out, padded[radius + dy:radius + dy + height, radius + dx:radius + dx + width], out=out)
    return out


def ink_of(image: Image.Image) -> np.ndarray:
    """How much ink each pixel holds, (H, W) floats in [0, 1], whatever the image's mode and polarity:
    the distance from the background (the border's median) in the ink's direction, faint noise zeroed."""
    gray, alpha = _gray_and_alpha(image)
    if alpha is not None and alpha.mean() < 0.5:
        # Mostly transparent: a digit painted on a transparent layer; what is painted is the ink, whatever
        # its colour (and the colour of the invisible pixels, often black, means nothing).
        difference = alpha
    else:
        if alpha is not None:
            # Opaque paper with transparent parts: those parts become paper (the opaque pixels' median).
            paper = np.median(gray[alpha >= 0.5])
            gray = gray * alpha + paper * (1 - alpha)
        edge = max(1, round(0.02 * min(gray.shape)))
        border = np.concatenate([gray[:edge].ravel(), gray[-edge:].ravel(), gray[:, :edge].ravel(),
                                 gray[:, -edge:].ravel()])
        background = np.median(border)
        # The ink is on the side of the background where the image reaches furthest (percentiles, so a
        # few stray pixels do not decide it); a light background is inverted.
        darkest, lightest = np.percentile(gray, [0.1, 99.9])
        light_background = background - darkest > lightest - background
        difference = (background - gray) if light_background else (gray - background)
    strongest = difference.max()
    if strongest < MIN_CONTRAST:
        raise ImageRejected("no ink found: nothing in the image stands out from its background")
    ink = (difference / strongest).clip(0, 1)
    ink[ink < NOISE_FRACTION] = 0
    return ink.astype(np.float32)


def _gray_and_alpha(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Luminance and opacity as floats in [0, 1] (opacity None when the image has none), box-averaged
    down to at most WORK_PIXELS."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # 16-bit grayscale (PNG, TIFF): Pillow's convert("L") would clip it at 255, not scale it.
        gray = image.convert("F") if image.mode in ("I", "F") else image.convert("I").convert("F")
        full_scale = 65535.0 if image.mode != "F" else max(1.0, float(np.asarray(gray).max()))
        alpha = None
    elif "A" in image.getbands() or "transparency" in image.info:  # RGBA, LA, PA, or a transparent colour
        rgba = image.convert("RGBA")
        gray, alpha = rgba.convert("L"), rgba.getchannel("A")
        full_scale = 255.0
    else:
        # CMYK, YCbCr, palette, 1-bit: through RGB, whose conversion to luminance Pillow does right.
        gray = image.convert("L") if image.mode in ("L", "RGB") else image.convert("RGB").convert("L")
        full_scale, alpha = 255.0, None
    factor = int(np.ceil(np.sqrt(gray.width * gray.height / WORK_PIXELS)))
    if factor > 1:
        gray = gray.reduce(factor)
        alpha = alpha.reduce(factor) if alpha is not None else None
    gray_array = np.asarray(gray, np.float32) / full_scale
    return gray_array, (np.asarray(alpha, np.float32) / 255.0 if alpha is not None else None)
