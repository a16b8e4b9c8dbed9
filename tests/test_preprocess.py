"""MNIST-style preprocessing of users' images, and the checks on untrusted files. Images are built here
with Pillow; the expected numbers are computed independently with numpy."""
import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from vitscope.preprocess import MAX_PIXELS, ImageRejected, decode_image, mnist_style, read_image, stroke_width


def digit_like(size=(120, 90), ink=0, paper=255, mode="L", offset=(0, 0)) -> Image.Image:
    """A '7'-like antialiased shape (a bar and a slanted stroke) away from the centre of a larger page."""
    w, h = size
    big = Image.new("L", (4 * w, 4 * h), 0)
    draw = ImageDraw.Draw(big)
    ox, oy = 4 * offset[0], 4 * offset[1]
    draw.line([(ox + 60, oy + 60), (ox + 180, oy + 60), (ox + 110, oy + 260)], fill=255, width=24)
    coverage = np.asarray(big.resize((w, h), Image.Resampling.BOX), np.float32)[..., None] / 255
    colours = np.array(ink if isinstance(ink, tuple) else (ink,) * 3), np.array(
        paper if isinstance(paper, tuple) else (paper,) * 3)
    rgb = colours[1] * (1 - coverage) + colours[0] * coverage
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB").convert(mode)


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    weights = image.astype(np.float64)
    rows, cols = np.indices(image.shape)
    return (rows * weights).sum() / weights.sum(), (cols * weights).sum() / weights.sum()


def ink_box(image: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(image)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


@pytest.mark.parametrize("normalize_stroke", [True, False])
def test_centre_of_mass_lands_on_the_centre_and_the_longest_side_is_20(normalize_stroke):
    out = mnist_style(digit_like(size=(300, 200), offset=(150, 100)), normalize_stroke=normalize_stroke)
    assert out.shape == (28, 28) and out.dtype == np.uint8
    row, col = centre_of_mass(out)
    # MNIST moved digits by whole pixels so the centre of mass is at (14, 14): within half a pixel.
    assert abs(row - 14) <= 0.5 and abs(col - 14) <= 0.5
    assert max(ink_box(out)) == 20
    assert out.max() == 255 and out[0].max() == out[:, 0].max() == 0  # white ink on black, full strength


def test_aspect_ratio_is_kept():
    page = np.full((300, 400), 255, np.uint8)
    page[50:150, 100:150] = 0  # a bar 100 tall and 50 wide
    out = mnist_style(Image.fromarray(page), normalize_stroke=False)
    assert ink_box(out) == (20, 10)


def test_inverted_image_gives_the_same_input():
    image = digit_like()
    assert np.array_equal(mnist_style(image), mnist_style(ImageOps.invert(image)))
    colour = digit_like(ink=(30, 40, 160), paper=(250, 240, 200), mode="RGB")
    assert similarity(mnist_style(colour), mnist_style(ImageOps.invert(colour))) > 0.99


def test_faint_noise_neither_moves_nor_grows_the_digit():
    clean = np.asarray(digit_like(size=(200, 150), offset=(40, 20)), np.float32)
    noise = np.random.default_rng(0).uniform(-20, 0, clean.shape)  # up to 8% of full scale, everywhere
    noisy = Image.fromarray((clean + noise).clip(0, 255).astype(np.uint8))
    a, b = mnist_style(Image.fromarray(clean.astype(np.uint8))), mnist_style(noisy)
    assert ink_box(b) == ink_box(a) and similarity(a, b) > 0.98


def test_stroke_width_of_a_bar_is_its_width():
    bar = np.zeros((100, 100), np.float32)
    bar[10:90, 40:46] = 1  # 6 px wide, 80 long: 2 * area / outline = 2 * 480 / (2 * 80 + 2 * 6)
    assert stroke_width(bar) == pytest.approx(2 * 480 / 172, rel=0.01)  # corners: a diagonal step


def test_marker_and_fine_pen_become_mnist_width():
    def pen(width):
        page = Image.new("L", (200, 200), 255)
        ImageDraw.Draw(page).line([(60, 30), (140, 30), (90, 170)], fill=0, width=width)
        return stroke_width(mnist_style(page).astype(np.float32) / 255)
    assert 1.8 < pen(3) < 3.3 and 1.8 < pen(30) < 3.3  # MNIST's middle 80%, by the same measure


def test_a_digit_smaller_than_the_box_keeps_its_strokes():
    # 12 px type: the ink is scaled up to 20 px, and what a width measured then shows is the upscale's blur.
    small = Image.new("L", (40, 40), 255)
    ImageDraw.Draw(small).line([(14, 14), (24, 14), (18, 26)], fill=0, width=1)
    assert np.array_equal(mnist_style(small), mnist_style(small, normalize_stroke=False))
    large = small.resize((400, 400), Image.Resampling.LANCZOS)  # the same drawing, now a hairline on 120 px
    assert not np.array_equal(mnist_style(large), mnist_style(large, normalize_stroke=False))


def test_an_image_without_ink_is_rejected():
    for image in (Image.new("L", (50, 50), 255), Image.new("RGB", (50, 50), (200, 30, 30)),
                  Image.new("RGBA", (50, 50), (0, 0, 0, 0))):
        with pytest.raises(ImageRejected, match="no ink"):
            mnist_style(image)


# ---- formats and modes ---------------------------------------------------------------------------------

def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


REFERENCE = mnist_style(digit_like())


def transparent_ink() -> Image.Image:
    """Black ink painted on a fully transparent layer whose invisible pixels are black too."""
    alpha = ImageOps.invert(digit_like())
    return Image.merge("RGBA", [Image.new("L", alpha.size, 0)] * 3 + [alpha])


def paper_with_transparent_margin() -> Image.Image:
    image = digit_like(size=(160, 130), offset=(20, 20)).convert("RGBA")
    alpha = Image.new("L", image.size, 0)
    alpha.paste(255, (10, 10, 150, 120))  # opaque white paper, transparent all around it
    image.putalpha(alpha)
    return image


def palette_with_transparency() -> Image.Image:
    image = digit_like().quantize(8)
    image.info["transparency"] = int(np.asarray(image)[0, 0])  # the paper's palette entry
    return image


def sixteen_bit() -> Image.Image:
    return Image.fromarray(np.asarray(digit_like(), np.uint16) * 257)  # 0..65535


@pytest.mark.parametrize("name, data", [
    ("PNG gray", lambda: encoded(digit_like(), "PNG")),
    ("PNG RGB colour", lambda: encoded(digit_like(ink=(20, 90, 30), paper=(255, 230, 240), mode="RGB"), "PNG")),
    ("PNG 16-bit gray", lambda: encoded(sixteen_bit(), "PNG")),
    ("PNG palette", lambda: encoded(digit_like(mode="RGB").quantize(16), "PNG")),
    ("PNG 1-bit", lambda: encoded(digit_like().point(lambda v: 255 * (v > 128)).convert("1"), "PNG")),
    ("PNG RGBA ink on transparent", lambda: encoded(transparent_ink(), "PNG")),
    ("PNG LA paper with transparent margin", lambda: encoded(paper_with_transparent_margin().convert("LA"), "PNG")),
    ("PNG palette transparency", lambda: encoded(palette_with_transparency(), "PNG")),
    ("JPEG RGB", lambda: encoded(digit_like(mode="RGB"), "JPEG", quality=90)),
    ("JPEG CMYK", lambda: encoded(digit_like(mode="RGB").convert("CMYK"), "JPEG", quality=90)),
    ("BMP", lambda: encoded(digit_like(mode="RGB"), "BMP")),
    ("GIF", lambda: encoded(digit_like(), "GIF")),
    ("WebP", lambda: encoded(digit_like(mode="RGB"), "WEBP", quality=90)),
    ("WebP RGBA", lambda: encoded(transparent_ink(), "WEBP", lossless=True)),
    ("TIFF 16-bit", lambda: encoded(sixteen_bit(), "TIFF")),
    ("TIFF RGB", lambda: encoded(digit_like(mode="RGB"), "TIFF")),
])
def test_formats_and_modes_are_read(name, data):
    assert similarity(mnist_style(decode_image(data())), REFERENCE) > 0.95, name


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as a phone held upright writes
    stored = digit_like(mode="RGB").transpose(Image.Transpose.ROTATE_90)
    data = encoded(stored, "JPEG", quality=90, exif=exif.tobytes())
    assert similarity(mnist_style(decode_image(data)), REFERENCE) > 0.95
    assert similarity(mnist_style(stored), REFERENCE) < 0.9  # the test means something


def test_gif_first_frame_is_used():
    frames = [digit_like(mode="P"), ImageOps.invert(digit_like()).transpose(Image.Transpose.ROTATE_180).convert("P")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    assert similarity(mnist_style(decode_image(buffer.getvalue())), REFERENCE) > 0.95


def test_a_lying_extension_does_not_matter(tmp_path):
    path = tmp_path / "digit.png"
    path.write_bytes(encoded(digit_like(mode="RGB"), "JPEG", quality=95))
    assert similarity(mnist_style(read_image(path)), REFERENCE) > 0.95


# ---- files that must be refused --------------------------------------------------------------------------

def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header says width x height: a decompression bomb's calling card."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    ihdr = data[12:29]  # chunk type + 13 bytes of IHDR
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_a_bomb_in_pillows_warning_zone_is_refused_silently_and_the_filters_stay():
    # 100 megapixels: over Pillow's default MAX_IMAGE_PIXELS (89.5), under twice that, where it only warns.
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 10_000 < 2 * Image.MAX_IMAGE_PIXELS
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageRejected, match="40 megapixels"):
            decode_image(png_claiming(10_000, 10_000))
    assert caught == [] and warnings.filters == filters


@pytest.mark.parametrize("pillows_limit", [None, 10**12])
def test_our_pixel_limits_hold_whatever_pillows_limit_is(monkeypatch, pillows_limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillows_limit)  # a program's own choice, left alone
    assert MAX_PIXELS == 40_000_000
    for width, height in ((7000, 7000), (100_000, 100_000)):
        with pytest.raises(ImageRejected, match="40 megapixels"):
            decode_image(png_claiming(width, height))
    assert Image.MAX_IMAGE_PIXELS == pillows_limit


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("these are not the pixels you are looking for"), "not an image"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(encoded(digit_like(), "PNG")[:300]), "truncated"),
    (lambda p: p.write_bytes(encoded(digit_like(mode="RGB"), "JPEG")[:400]), "truncated"),
    (lambda p: p.write_bytes(png_claiming(100_000, 100_000)), "over the limit"),
    (lambda p: p.write_bytes(png_claiming(7000, 7000)), "40 megapixels"),
    (lambda p: p.write_bytes(encoded(Image.new("L", (9000, 2), 255), "PNG")), "8192 px"),
    (lambda p: os.truncate(p, 21 * 2**20), "20 MB"),
    (lambda p: p.mkdir(), "directory"),
    (lambda p: os.mkfifo(p), "not a regular file"),  # reading it would wait forever
    (lambda p: None, "no such file"),
])
def test_bad_files_are_refused_with_their_reason(tmp_path, make, message):
    path = tmp_path / "upload.png"
    if message == "20 MB":
        path.touch()
    make(path)
    with pytest.raises(ImageRejected, match=message):
        read_image(path)


def test_formats_pillow_could_open_but_we_do_not_take_are_refused():
    with pytest.raises(ImageRejected, match="not a supported format"):
        decode_image(encoded(digit_like(), "PPM"))
