"""Digits that are not MNIST: 0-9 rendered from the TrueType/OpenType fonts on this machine, under the
conditions users' images come in, and how well models classify them with and without MNIST-style
preprocessing.

    python benchmarks/font_digits.py fonts                                   # the fonts it finds
    python benchmarks/font_digits.py make --out /tmp/font-digits            # the image set + labels.csv
    python benchmarks/font_digits.py make --out /tmp/font-digits --families benchmarks/font-families.txt
    python benchmarks/font_digits.py make --out /tmp/heldout --families benchmarks/heldout-families.txt
    python benchmarks/font_digits.py evaluate /tmp/font-digits --model src/vitscope/bundled --model runs/seed

Fonts are every *.ttf / *.otf under /usr/share/fonts (and --font-dir) that has a Regular and a Bold
face with ASCII digits, one per distinct digit design (families that draw their digits identically,
like the Noto script families that share Noto Sans's, count once). On Debian:

    apt-get install --no-install-recommends fontconfig fonts-dejavu-core fonts-liberation fonts-liberation2
        fonts-freefont-ttf fonts-noto-core fonts-urw-base35 fonts-crosextra-carlito fonts-crosextra-caladea
        fonts-linuxlibertine fonts-open-sans fonts-roboto-unhinted fonts-lato fonts-cantarell fonts-firacode
        fonts-hack fonts-go fonts-comic-neue

(36 families on Debian 12, listed in benchmarks/font-families.txt; benchmarks/heldout-families.txt names 28
more and their packages, a set of fonts no recipe was compared on. Make either set with --families. TeX Gyre
and Latin Modern install under /usr/share/texmf: add them with --font-dir /usr/share/texmf/fonts/opentype.)

Each condition changes one thing from `clean` (black on white, 64 px type, centred, upright, PNG);
`mixed` draws all of them at random per image. Three columns per model: "MNIST-style" is vitscope's
preprocessing (vitscope.preprocess.mnist_style), "strokes as drawn" the same without its stroke-width
step, and "plain resize" the alternative without preprocessing: the whole image converted to grayscale,
resized to 28x28 (Lanczos), inverted when its border is light.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_DIRS = [Path("/usr/share/fonts")]
REGULAR_STYLES = ("Regular", "Book", "Roman", "Normal")
# Not digits at all, or digits in a non-Latin design a user would not call "a 7".
SKIP_FAMILY = re.compile(r"symbol|dingbat|math|emoji|icon|ornament|Noto Sans (?!Mono)|Noto Serif (?!Display)",
                         re.IGNORECASE)


@dataclass(frozen=True)
class Condition:
    size: int = 64  # font size in px
    off_centre: bool = False
    rotation: float = 0.0  # the largest angle, degrees; drawn uniformly in [-rotation, rotation]
    inverted: bool = False
    coloured: bool = False
    jpeg_quality: int | None = None
    pen: str = "normal"  # "thin" (the font eroded), "normal", "thick" (stroked)


CLEAN = Condition()
CONDITIONS = {
    "clean": CLEAN,
    "size 12 px": replace(CLEAN, size=12),
    "size 20 px": replace(CLEAN, size=20),
    "size 200 px": replace(CLEAN, size=200),
    "off-centre": replace(CLEAN, off_centre=True),
    "rotated up to 15 deg": replace(CLEAN, rotation=15.0),
    "white on black": replace(CLEAN, inverted=True),
    "coloured ink and paper": replace(CLEAN, coloured=True),
    "JPEG quality 30": replace(CLEAN, jpeg_quality=30),
    "thin pen": replace(CLEAN, pen="thin"),
    "thick pen": replace(CLEAN, pen="thick"),
}
MIXED = "mixed (all at random)"


def font_files(extra_dirs: list[Path]) -> list[Path]:
    return sorted(p for d in FONT_DIRS + extra_dirs for p in d.rglob("*") if p.suffix.lower() in (".ttf", ".otf"))


def digit_fonts(extra_dirs: list[Path] = ()) -> list[tuple[str, Path, Path]]:
    """(family, regular file, bold file) per distinct digit design, sorted by family."""
    faces: dict[str, dict[str, Path]] = {}
    for path in font_files(list(extra_dirs)):
        try:
            family, style = ImageFont.truetype(str(path), 32).getname()
        except OSError:
            continue
        if family and not SKIP_FAMILY.search(family):
            faces.setdefault(family, {}).setdefault(style, path)
    chosen, seen = [], set()
    for family in sorted(faces):
        styles = faces[family]
        regular = next((styles[s] for s in REGULAR_STYLES if s in styles), None)
        if regular is None or "Bold" not in styles:
            continue
        design = _digit_design(regular)
        if design is None or design in seen:
            continue
        seen.add(design)
        chosen.append((family, regular, styles["Bold"]))
    return chosen


def _digit_design(path: Path) -> str | None:
    """A hash of how the font draws 0-9, or None when it lacks them (they draw as its missing-glyph box)."""
    font = ImageFont.truetype(str(path), 32)
    masks = [bytes(font.getmask(c)) for c in "0123456789"]
    missing = bytes(font.getmask("\uffff"))
    if any(m == missing or not any(m) for m in masks) or len(set(masks)) < 10:
        return None
    return hashlib.sha256(b"|".join(masks)).hexdigest()


def render(digit: str, font_path: Path, condition: Condition, rng: np.random.Generator) -> Image.Image:
    """One digit as a user's image: ink drawn as a coverage mask, then given paper and ink colours."""
    size = condition.size
    canvas = np.array([size * 2.5, size * 2.5] if condition.off_centre else [size * 1.6, size * 1.4]).astype(int)
    if condition.off_centre:  # somewhere in the outer part of a larger page, not in its middle
        centre = canvas / 2 + rng.choice([-1, 1], 2) * rng.uniform(0.25, 0.3, 2) * canvas
    else:
        centre = canvas / 2
    # A thin pen is the font eroded by 1/64 of the type size per side; drawn 4x larger and shrunk, so that
    # is a fraction of a pixel at small sizes rather than the whole stroke.
    supersample = 4 if condition.pen == "thin" else 1
    font = ImageFont.truetype(str(font_path), size * supersample)
    stroke = max(1, round(size / 14)) if condition.pen == "thick" else 0
    mask = Image.new("L", tuple(canvas * supersample), 0)
    draw = ImageDraw.Draw(mask)
    left, top, right, bottom = draw.textbbox((0, 0), digit, font=font, stroke_width=stroke)
    # Centre the ink's box itself (a text anchor centres the line's box, and digits sit on the baseline).
    origin = centre * supersample - np.array([(left + right) / 2, (top + bottom) / 2])
    draw.text(tuple(origin), digit, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    if condition.pen == "thin":
        mask = mask.filter(ImageFilter.MinFilter(2 * max(1, round(size * supersample / 64)) + 1))
        mask = mask.resize(tuple(canvas), Image.Resampling.BOX)
    if condition.rotation:
        mask = mask.rotate(rng.uniform(-condition.rotation, condition.rotation), Image.Resampling.BICUBIC)
    paper, ink = np.array([255, 255, 255]), np.array([0, 0, 0])
    if condition.coloured:
        paper, ink = _contrasting_colours(rng)
    if condition.inverted:
        paper, ink = ink, paper
    coverage = np.asarray(mask, np.float32)[..., None] / 255
    return Image.fromarray((paper * (1 - coverage) + ink * coverage).round().astype(np.uint8), "RGB")


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random light paper and a random dark ink, at least 100 grey levels apart in luminance (ink you
    can read: a pale yellow on white is not a digit to anyone)."""
    while True:
        paper, ink = rng.integers(150, 256, 3), rng.integers(0, 140, 3)
        luma = np.array([0.299, 0.587, 0.114])
        if paper @ luma - ink @ luma >= 100:
            return paper, ink


def make(out: Path, extra_dirs: list[Path], mixed_per_font: int, seed: int, families: Path | None = None) -> None:
    fonts = digit_fonts(extra_dirs)
    if families is not None:  # one family name per line, '#' starts a comment
        wanted = {line.split("#")[0].strip() for line in families.read_text().splitlines()} - {""}
        missing = wanted - {family for family, _, _ in fonts}
        if missing:
            sys.exit(f"not found among the fonts: {', '.join(sorted(missing))} (see {families})")
        fonts = [font for font in fonts if font[0] in wanted]
    if not fonts:
        sys.exit("no fonts with digits found under /usr/share/fonts: install some (see this script's docstring)")
    rng = np.random.default_rng(seed)
    rows = []
    # (condition name, fixed condition or None for a random one per image, file-name suffix)
    jobs = [(name, condition, "") for name, condition in CONDITIONS.items()]
    jobs += [(MIXED, None, f"-{k}") for k in range(mixed_per_font)]
    for name, condition, suffix in jobs:
        folder = out / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        folder.mkdir(parents=True, exist_ok=True)
        for family, regular, bold in fonts:
            for weight, path in (("regular", regular), ("bold", bold)):
                for digit in "0123456789":
                    c = condition or _random_condition(rng)
                    image = render(digit, path, c, rng)
                    file = f"{re.sub(r'[^A-Za-z0-9]+', '', family)}-{weight}-{digit}{suffix}"
                    if c.jpeg_quality:
                        file += ".jpg"
                        image.save(folder / file, quality=c.jpeg_quality)
                    else:
                        file += ".png"
                        image.save(folder / file)
                    rows.append((f"{folder.name}/{file}", digit, name, family, weight))
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "condition", "family", "weight"])
        writer.writerows(rows)
    print(f"{len(rows)} images of {len(fonts)} font families (regular and bold) in {out}")
    print("families: " + ", ".join(family for family, _, _ in fonts))


def _random_condition(rng: np.random.Generator) -> Condition:
    return Condition(size=int(rng.choice([12, 16, 20, 28, 40, 64, 100, 150, 200])), off_centre=bool(rng.random() < 0.5),
                     rotation=15.0 if rng.random() < 0.5 else 0.0, inverted=bool(rng.random() < 0.5),
                     coloured=bool(rng.random() < 0.5), jpeg_quality=30 if rng.random() < 0.3 else None,
                     pen=str(rng.choice(["thin", "normal", "thick"])))


def plain_resize(image: Image.Image, size: int) -> np.ndarray:
    """The comparison without MNIST preprocessing: the whole image to size x size grayscale, inverted when
    its border is light (so polarity alone is not what separates the two)."""
    gray = np.asarray(image.convert("L").resize((size, size), Image.Resampling.LANCZOS))
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return 255 - gray if np.median(border) > 127 else gray


def evaluate(folder: Path, models: list[Path]) -> None:
    import torch

    from vitscope.prediction import classify, load_model, model_input_size
    from vitscope.preprocess import ImageRejected, mnist_style, read_image

    torch.set_num_threads(1)
    with open(folder / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r["label"]) for r in rows])
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    images = [read_image(folder / r["file"]) for r in rows]
    modes = {"MNIST-style": lambda im, size: mnist_style(im, size),
             "MNIST-style, strokes as drawn": lambda im, size: mnist_style(im, size, normalize_stroke=False),
             "plain resize": plain_resize}
    prepared = {}  # (mode, input size) -> (inputs, read): the same for every model of that size

    def prepare(mode: str, size: int) -> tuple[np.ndarray, np.ndarray]:
        if (mode, size) not in prepared:
            inputs, read = np.zeros((len(images), size, size), np.uint8), np.ones(len(images), bool)
            for i, image in enumerate(images):
                try:
                    inputs[i] = modes[mode](image, size)
                except ImageRejected:  # e.g. a tiny thin digit in pale ink after JPEG: counted as wrong
                    read[i] = False
            prepared[(mode, size)] = inputs, read
        return prepared[(mode, size)]

    columns = {}
    for model_path in models:
        model = load_model(model_path)
        size = model_input_size(model)
        for mode in modes:
            inputs, read = prepare(mode, size)
            probs = torch.cat([classify(model, inputs[i:i + 2000]) for i in range(0, len(inputs), 2000)])
            columns[(str(model_path), mode)] = (probs.argmax(1).numpy() == labels) & read
    print("| condition | images | " + " | ".join(f"`{m}`, {mode}" for m, mode in columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for condition in conditions + ["all"]:
        pick = np.array([condition in ("all", r["condition"]) for r in rows])
        cells = [f"{correct[pick].mean():.1%}" for correct in columns.values()]
        name = f"**{condition}**" if condition == "all" else condition
        print(f"| {name} | {pick.sum()} | " + " | ".join(cells) + " |")
    unread = {f"{mode} ({size} px)": int((~read).sum())
              for (mode, size), (_, read) in prepared.items() if not read.all()}
    if unread:
        print("\nImages the preprocessing found no ink in, counted as wrong for every model: "
              + ", ".join(f"{mode}: {count}" for mode, count in unread.items()))
    families = sorted({r["family"] for r in rows})
    print(f"\n{len(families)} font families, regular and bold: {', '.join(families)}")
    for model_path in models:
        correct = columns[(str(model_path), "MNIST-style")]
        by_family = {f: correct[np.array([r["family"] == f for r in rows])].mean() for f in families}
        worst = sorted(by_family.items(), key=lambda item: item[1])[:5]
        print(f"`{model_path}` with MNIST-style preprocessing, weakest families: "
              + ", ".join(f"{f} {acc:.1%}" for f, acc in worst))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("fonts", help="list the font families the set would use, with their files")
    p.add_argument("--font-dir", type=Path, action="append", default=[], help="more fonts to search")
    p = commands.add_parser("make", help="render the image set and labels.csv")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--font-dir", type=Path, action="append", default=[], help="more fonts to search")
    p.add_argument("--mixed-per-font", type=int, default=2, help="random-condition images per glyph (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--families", type=Path, help="render only the families named in this file, one per line")
    p = commands.add_parser("evaluate", help="accuracy per condition, with and without preprocessing (markdown)")
    p.add_argument("folder", type=Path)
    p.add_argument("--model", type=Path, action="append", required=True, help="run directory (repeatable)")
    args = parser.parse_args()
    if args.command == "fonts":
        for family, regular, bold in digit_fonts(args.font_dir):
            print(f"{family}\t{regular}\t{bold}")
    elif args.command == "make":
        make(args.out, args.font_dir, args.mixed_per_font, args.seed, args.families)
    else:
        evaluate(args.folder, args.model)


if __name__ == "__main__":
    main()
