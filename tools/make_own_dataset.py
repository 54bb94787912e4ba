"""Write a small "bring your own data" dataset: JPEG images with JSONL manifests, as a user would bring them.

    python -m tools.make_own_dataset --out data/raw/own --train 2000 --val 100 --test 200 --caption-fraction 0.8

It exists to try the pipeline on data it was not built around. Everything differs from the synthetic scenes
(vlm/data/synthetic.py) on purpose, and nothing here is imported by the pipeline: another renderer (shapes drawn
as masks at 4x and shrunk with a Lanczos filter, so their edges are antialiased, over textured or gradient
backgrounds of five named kinds, with pixel noise), another size and format (64 x 64 JPEG instead of 224 px PNG),
other shapes and colour names, other question phrasings and types (including what the background is), captions
on only part of the images and worded otherwise, and no regions. An image holds 1 or 2 objects (mostly 1) of
different shapes and colours, so every question has one answer; where two words name it ("grey"/"gray"), the
question lists both as reference answers, five times each the way ten VQA annotators would, so either word
scores full VQA accuracy.

The output folder holds train.jsonl, val.jsonl, test.jsonl (the manifest layout of vlm/data/jsonl_manifest.py;
image paths relative to the folder), images/{split}/*.jpg and a README.md. Every image is drawn from
(--seed, split, index), so the same arguments give byte-identical files; the splits never share an image.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

SPLITS = ("train", "val", "test")
IMAGE_SIZE = 64
SUPERSAMPLE = 4  # drawn at 4x, then shrunk: antialiased edges
JPEG_QUALITY = 90

# Each name with the words a person could answer with; the first is the one captions use.
COLORS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "teal": ((0, 128, 128), ("teal",)),
    "magenta": ((205, 0, 205), ("magenta",)),
    "brown": ((125, 70, 25), ("brown",)),
    "navy": ((20, 30, 115), ("navy",)),
    "lime": ((120, 210, 20), ("lime",)),
    "pink": ((250, 120, 175), ("pink",)),
    "grey": ((110, 110, 110), ("grey", "gray")),
    "black": ((20, 20, 20), ("black",)),
}
SHAPES: dict[str, tuple[str, ...]] = {
    "heart": ("heart",),
    "arrow": ("arrow",),
    "ring": ("ring",),
    "moon": ("moon", "crescent"),
    "hexagon": ("hexagon",),
    "diamond": ("diamond",),
}
SHAPE_PLURALS = {"heart": "hearts", "arrow": "arrows", "ring": "rings", "moon": "moons", "hexagon": "hexagons",
                 "diamond": "diamonds"}
# Backgrounds: what a question about them accepts, and how captions describe them.
BACKGROUNDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "plain": (("plain",), ("a plain background", "a blank backdrop")),
    "gradient": (("gradient",), ("a soft gradient", "a fading background")),
    "stripes": (("stripes", "striped"), ("stripes", "a striped background")),
    "dots": (("dots", "dotted"), ("polka dots", "a dotted background")),
    "checkerboard": (("checkerboard", "checkered"), ("a checkerboard", "a checkered background")),
}
# Pale tones the backgrounds are made of; every shape colour stands out against all of them.
PALE_TONES = ((238, 232, 218), (222, 234, 242), (226, 240, 222), (236, 236, 236), (244, 228, 228))
DIRECTIONS = ("up", "right", "down", "left")  # an arrow's, which only captions mention
ANNOTATORS_PER_WORD = 5  # a synonym answer is listed 5 times per word, so each reaches full VQA accuracy
TWO_OBJECT_SHARE = 0.25

SHAPE_QUESTIONS = ("Which shape is drawn?", "What shape do you see?", "Name the shape in the picture.")
SHAPE_OF_COLOR_QUESTIONS = ("Which shape is {color}?", "What is the {color} shape?")
COLOR_QUESTIONS = ("What colour is the shape?", "Which colour is the object?", "What colour has it been painted?")
COLOR_OF_SHAPE_QUESTIONS = ("What colour is the {shape}?", "Which colour does the {shape} have?")
BACKGROUND_QUESTIONS = ("What is behind the {thing}?", "What pattern is the background?",
                        "What kind of background is it?")
COUNT_QUESTIONS = ("How many shapes are there?", "How many objects can you count?")
EXISTS_QUESTIONS = ("Is there a {color} {shape}?", "Can you see a {color} {shape}?")
NUMBER_WORDS = {1: "one", 2: "two"}


@dataclass(frozen=True)
class Thing:
    shape: str
    color: str
    x: float  # centre, fraction of the canvas
    y: float
    radius: float  # fraction of the canvas
    direction: str  # arrows only
    big: bool


@dataclass(frozen=True)
class Picture:
    background: str
    things: tuple[Thing, ...]


# --------------------------------------------------------------------------- what an image shows


def sample_picture(rng: np.random.Generator) -> Picture:
    count = 2 if rng.random() < TWO_OBJECT_SHARE else 1
    shapes = rng.choice(list(SHAPES), size=count, replace=False)
    colors = rng.choice(list(COLORS), size=count, replace=False)
    background = str(rng.choice(list(BACKGROUNDS)))
    radii = rng.uniform(0.22, 0.33, size=1) if count == 1 else rng.uniform(0.14, 0.19, size=2)
    while True:  # non-overlapping centres, inside the canvas
        centres = [(rng.uniform(r + 0.03, 1 - r - 0.03), rng.uniform(r + 0.03, 1 - r - 0.03)) for r in radii]
        if count == 1 or math.dist(*centres) > radii[0] + radii[1] + 0.04:
            break
    things = tuple(Thing(str(shape), str(color), float(x), float(y), float(r), str(rng.choice(DIRECTIONS)),
                         bool(r > (0.28 if count == 1 else 0.165)))
                   for shape, color, (x, y), r in zip(shapes, colors, centres, radii))
    return Picture(background, things)


# --------------------------------------------------------------------------- drawing


def render(picture: Picture, rng: np.random.Generator) -> bytes:
    side = IMAGE_SIZE * SUPERSAMPLE
    canvas = _background(picture.background, side, rng)
    for thing in picture.things:
        mask = Image.new("L", (side, side), 0)
        _draw_mask(ImageDraw.Draw(mask), thing, side)
        rgb = np.clip(np.array(COLORS[thing.color][0]) + rng.integers(-12, 13, size=3), 0, 255)
        canvas.paste(tuple(int(v) for v in rgb), mask=mask)
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    noisy = np.asarray(small, dtype=np.int16) + rng.normal(0, 3.0, size=(IMAGE_SIZE, IMAGE_SIZE, 1)).round().astype(
        np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def _background(kind: str, side: int, rng: np.random.Generator) -> Image.Image:
    first, second = (np.array(PALE_TONES[i], dtype=np.float32) for i in rng.choice(len(PALE_TONES), 2, replace=False))
    darker = first * 0.86
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    if kind == "plain":
        pattern = np.zeros((side, side), dtype=np.float32)
        second = first
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = x * math.cos(angle) + y * math.sin(angle)
        pattern = (ramp - ramp.min()) / (ramp.max() - ramp.min())
        second = darker * 0.95
    elif kind == "stripes":
        period = rng.uniform(0.12, 0.2)
        angle = rng.choice([0.25, 0.75, 0.0, 0.5]) * math.pi
        pattern = (((x * math.cos(angle) + y * math.sin(angle)) / period) % 1.0 < 0.5).astype(np.float32)
        second = darker
    elif kind == "dots":
        period = rng.uniform(0.14, 0.2)
        fx, fy = (x / period) % 1.0 - 0.5, (y / period) % 1.0 - 0.5
        pattern = (fx * fx + fy * fy < 0.22 ** 2).astype(np.float32)
        second = darker
    elif kind == "checkerboard":
        cells = int(rng.integers(5, 9))
        pattern = ((np.floor(x * cells) + np.floor(y * cells)) % 2).astype(np.float32)
        second = darker
    else:
        raise ValueError(f"unknown background {kind!r}")
    pixels = first * (1 - pattern[..., None]) + second * pattern[..., None]
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


def _draw_mask(draw: ImageDraw.ImageDraw, thing: Thing, side: int) -> None:
    cx, cy, r = thing.x * side, thing.y * side, thing.radius * side

    def points(coords: Sequence[tuple[float, float]], turn: float = 0.0) -> list[tuple[float, float]]:
        c, s = math.cos(turn), math.sin(turn)
        return [(cx + r * (u * c - v * s), cy + r * (u * s + v * c)) for u, v in coords]

    if thing.shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 120, endpoint=False)
        hx, hy = 16 * np.sin(ts) ** 3, -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        draw.polygon(points(list(zip(hx / 17, (hy + 2.5) / 17))), fill=255)
    elif thing.shape == "arrow":
        outline = [(-0.95, -0.22), (0.15, -0.22), (0.15, -0.6), (0.95, 0.0), (0.15, 0.6), (0.15, 0.22), (-0.95, 0.22)]
        turn = {"right": 0.0, "down": 0.5, "left": 1.0, "up": 1.5}[thing.direction] * math.pi
        draw.polygon(points(outline, turn), fill=255)
    elif thing.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        inner = r * 0.55
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif thing.shape == "moon":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        shift = r * 0.5
        draw.ellipse([cx - r + shift, cy - r - shift * 0.3, cx + r + shift, cy + r - shift * 0.3], fill=0)
    elif thing.shape == "hexagon":
        draw.polygon(points([(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]), fill=255)
    elif thing.shape == "diamond":
        draw.polygon(points([(0, -1), (0.68, 0), (0, 1), (-0.68, 0)]), fill=255)
    else:
        raise ValueError(f"unknown shape {thing.shape!r}")


# --------------------------------------------------------------------------- text


def answers(words: tuple[str, ...]) -> list[str]:
    """One word: that word alone (exact match). Synonyms: each word as often as several annotators would say it."""
    return [words[0]] if len(words) == 1 else [w for w in words for _ in range(ANNOTATORS_PER_WORD)]


def questions(picture: Picture, rng: np.random.Generator) -> list[dict]:
    things = picture.things
    pick = lambda options: str(rng.choice(options))  # noqa: E731
    asked = []
    if len(things) == 1:
        (one,) = things
        asked.append(("shape", pick(SHAPE_QUESTIONS), SHAPES[one.shape]))
        asked.append(("color", pick(COLOR_QUESTIONS), COLORS[one.color][1]))
    else:
        one = things[int(rng.integers(2))]
        asked.append(("shape", pick(SHAPE_OF_COLOR_QUESTIONS).format(color=one.color), SHAPES[one.shape]))
        other = things[int(rng.integers(2))]
        asked.append(("color", pick(COLOR_OF_SHAPE_QUESTIONS).format(shape=other.shape), COLORS[other.color][1]))
    asked.append(("background", pick(BACKGROUND_QUESTIONS).format(thing="shape" if len(things) == 1 else "shapes"),
                  BACKGROUNDS[picture.background][0]))
    asked.append(("count", pick(COUNT_QUESTIONS), (NUMBER_WORDS[len(things)],)))
    asked.append(("yes/no",) + _exists_question(things, rng))
    keep = sorted(rng.choice(len(asked), size=int(rng.integers(3, len(asked) + 1)), replace=False))
    return [{"question": asked[i][1], "answers": answers(asked[i][2]), "type": asked[i][0]} for i in keep]


def _exists_question(things: tuple[Thing, ...], rng: np.random.Generator) -> tuple[str, tuple[str, ...]]:
    template = str(rng.choice(EXISTS_QUESTIONS))
    shown = {(t.color, t.shape) for t in things}
    if rng.random() < 0.5:
        color, shape = sorted(shown)[int(rng.integers(len(shown)))]
        return template.format(color=color, shape=shape), ("yes",)
    # Absent: a shape in the picture in another colour, or a colour in the picture on another shape.
    base = things[int(rng.integers(len(things)))]
    while True:
        if rng.random() < 0.5:
            color, shape = str(rng.choice(list(COLORS))), base.shape
        else:
            color, shape = base.color, str(rng.choice(list(SHAPES)))
        if (color, shape) not in shown:
            return template.format(color=color, shape=shape), ("no",)


def captions(picture: Picture, rng: np.random.Generator) -> list[str]:
    backdrop = lambda: str(rng.choice(BACKGROUNDS[picture.background][1]))  # noqa: E731
    names = [_name(thing) for thing in picture.things]
    subject = names[0] if len(names) == 1 else f"{names[0]} and {names[1]}"
    forms = [f"{_article(subject).capitalize()} {subject} over {backdrop()}.",
             f"{backdrop().capitalize()} with {_article(subject)} {subject} on it",
             f"Drawing of {_article(subject)} {subject}, {backdrop()} behind"]
    if len(names) == 2:
        forms.append(f"Two shapes, {_article(names[0])} {names[0]} and {_article(names[1])} {names[1]}, on "
                     f"{backdrop()}.")
    count = 1 + int(rng.random() < 0.5)
    return [forms[i] for i in sorted(rng.choice(len(forms), size=count, replace=False))]


def _name(thing: Thing) -> str:
    size = "big " if thing.big else "small "
    name = f"{size}{thing.color} {thing.shape}"
    return f"{name} pointing {thing.direction}" if thing.shape == "arrow" else name


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


# --------------------------------------------------------------------------- files


def write_dataset(out: Path, sizes: dict[str, int], caption_fraction: float, seed: int, force: bool = False,
                  progress: bool = True) -> dict[str, int]:
    """Write the images, manifests and README; returns the number of images written per split."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise SystemExit(f"--out {out} is not empty; pass --force to replace the dataset there, or pick "
                             "another folder")
        shutil.rmtree(out / "images", ignore_errors=True)
        for name in (*(f"{split}.jsonl" for split in SPLITS), "README.md"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(sizes.values()), desc="own dataset", unit="img", disable=not progress)
    for split_index, split in enumerate(SPLITS):
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        count = sizes[split]
        chooser = np.random.default_rng([seed, split_index, 1 << 30])
        captioned = set(chooser.permutation(count)[:round(caption_fraction * count)].tolist())
        with open(out / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as manifest:
            for index in range(count):
                rng = np.random.default_rng([seed, split_index, index])
                picture = sample_picture(rng)
                name = f"images/{split}/{split}-{index:05d}.jpg"
                (out / name).write_bytes(render(picture, rng))
                record: dict = {"id": f"{split}-{index:05d}", "image": name}
                if index in captioned:
                    record["captions"] = captions(picture, rng)
                record["questions"] = questions(picture, rng)
                manifest.write(json.dumps(record) + "\n")
                bar.update()
    bar.close()
    (out / "README.md").write_text(_readme(sizes, caption_fraction, seed), encoding="utf-8")
    return dict(sizes)


def _readme(sizes: dict[str, int], caption_fraction: float, seed: int) -> str:
    return (
        "# Shapes on patterns: a small JSONL-manifest dataset\n\n"
        f"Made by `tools/make_own_dataset.py` (seed {seed}): {sizes['train']} train, {sizes['val']} val and "
        f"{sizes['test']} test images, {IMAGE_SIZE} x {IMAGE_SIZE} JPEG, each with 1 or 2 shapes on a patterned "
        f"background. {caption_fraction:.0%} of the images have 1-2 captions; every image has 3-5 questions with "
        "one-word answers.\n\n"
        f"- shapes: {', '.join(SHAPES)}\n- colours: {', '.join(COLORS)}\n- backgrounds: {', '.join(BACKGROUNDS)}\n"
        "- question types: shape, color, background, count, yes/no\n\n"
        "Point the pipeline at it with params `data.source: jsonl` and `data.jsonl.{train,val,test}: "
        "[<this folder>/{split}.jsonl]`.\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write (e.g. data/raw/own)")
    parser.add_argument("--train", type=int, default=2000, help="train images")
    parser.add_argument("--val", type=int, default=100, help="val images")
    parser.add_argument("--test", type=int, default=200, help="test images")
    parser.add_argument("--caption-fraction", type=float, default=None,
                        help="share of the images that get captions (default 0.8); the rest only questions")
    parser.add_argument("--no-captions", action="store_true", help="no captions at all: a question-only dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace the dataset in a non-empty --out")
    args = parser.parse_args(argv)
    if args.no_captions and args.caption_fraction not in (None, 0):
        parser.error("--no-captions and --caption-fraction contradict each other; give one of them")
    fraction = 0.0 if args.no_captions else 0.8 if args.caption_fraction is None else args.caption_fraction
    if not 0.0 <= fraction <= 1.0:
        parser.error(f"--caption-fraction must be between 0 and 1, got {fraction}")
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    for split, count in sizes.items():
        if count < 1:
            parser.error(f"--{split} must be at least 1 (the pipeline needs every split), got {count}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    write_dataset(args.out, sizes, fraction, args.seed, force=args.force)
    print(f"wrote {sum(sizes.values())} images and {args.out}/{{train,val,test}}.jsonl", file=sys.stderr)


if __name__ == "__main__":
    main()
