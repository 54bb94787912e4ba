"""A gallery of test images, each drawn beside the model's caption and answers and their references (PIL only).

One PNG per image, named after its id, for the first images of the split by id: the same images in every run, so
`dvc plots diff` puts two experiments' cards side by side.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vlm.artifacts import atomic_directory
from vlm.data.dataset_io import decode_image, iter_split
from vlm.eval.scoring import score_vqa

QUESTIONS_PER_IMAGE = 2
IMAGE_SIDE = 224            # the image is fitted into a square of this side
TEXT_WIDTH = 540            # pixels of text column
MARGIN, FONT_SIZE, LINE_GAP = 12, 14, 4
CONTINUATION = "      "     # indent of a wrapped line
INK, MUTED, GOOD, BAD, PAPER = (20, 20, 20), (110, 110, 110), (20, 130, 50), (190, 30, 30), (255, 255, 255)


def gallery_ids(records: Sequence[dict], count: int) -> list[str]:
    """The first `count` image ids of the evaluated records, in sorted order."""
    return sorted({record["image_id"] for record in records})[:count]


def read_images(dataset_path: Path, image_ids: Sequence[str]) -> dict[str, Image.Image]:
    """The decoded images of `image_ids`, in that order, from a dataset split (streamed; only those are decoded)."""
    wanted = set(image_ids)
    found = {row["image_id"]: decode_image(row["image"], row["image_id"])
             for row in iter_split(dataset_path, columns=["image_id", "image"]) if row["image_id"] in wanted}
    return {image_id: found[image_id] for image_id in image_ids}


def write_gallery(records: Sequence[dict], images: Mapping[str, Image.Image], out_dir: Path,
                  question_suffix: str = "") -> list[Path]:
    """Replace `out_dir` with one PNG card per image of `images` (see `render_card`); returns their paths."""
    by_image: dict[str, list[dict]] = {}
    for record in records:
        by_image.setdefault(record["image_id"], []).append(record)
    names = [re.sub(r"[^\w.-]", "_", image_id) + ".png" for image_id in images]
    with atomic_directory(out_dir) as tmp:
        for name, (image_id, image) in zip(names, images.items()):
            render_card(image_id, image, by_image.get(image_id, []), question_suffix).save(tmp / name)
    return [Path(out_dir) / name for name in names]


def render_card(image_id: str, image: Image.Image, records: Sequence[dict], question_suffix: str = "") -> Image.Image:
    """The image on the left; on the right its id, the predicted caption, the reference captions, and the first
    questions with the predicted answer (green if its VQA accuracy is 1, red if 0, else dark) and the references.
    `question_suffix` (the answer-format instruction appended to every question) is left out of the text."""
    font = ImageFont.load_default(size=FONT_SIZE)
    lines: list[tuple[str, tuple[int, int, int]]] = [(image_id, MUTED)]
    for record in [r for r in records if r["type"] == "caption"][:1]:
        lines += _wrapped(f"caption: {record['prediction'] or '(empty)'}", INK, font)
        for reference in record["references"]:
            lines += _wrapped(f"  ref: {reference}", MUTED, font)
    for record in [r for r in records if r["type"] != "caption"][:QUESTIONS_PER_IMAGE]:
        accuracy = score_vqa([record["prediction"]], [record["references"]])["vqa_accuracy"]
        color = GOOD if accuracy == 1 else BAD if accuracy == 0 else INK
        lines += _wrapped(f"Q: {record['instruction'].removesuffix(question_suffix)}", INK, font)
        lines += _wrapped(f"  A: {record['prediction'] or '(empty)'}   (accuracy {accuracy:.2f})", color, font)
        lines += _wrapped(f"  ref: {', '.join(sorted(set(record['references'])))}", MUTED, font)

    line_height = FONT_SIZE + LINE_GAP
    height = max(IMAGE_SIDE, len(lines) * line_height) + 2 * MARGIN
    card = Image.new("RGB", (IMAGE_SIDE + TEXT_WIDTH + 3 * MARGIN, height), PAPER)
    scale = IMAGE_SIDE / max(image.size)
    fitted = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                         Image.Resampling.BICUBIC)
    card.paste(fitted, (MARGIN, MARGIN))
    draw = ImageDraw.Draw(card)
    for i, (text, color) in enumerate(lines):
        draw.text((IMAGE_SIDE + 2 * MARGIN, MARGIN + i * line_height), text, fill=color, font=font)
    return card


def _wrapped(text: str, color: tuple[int, int, int], font: ImageFont.FreeTypeFont | ImageFont.ImageFont
             ) -> list[tuple[str, tuple[int, int, int]]]:
    """`text` cut at spaces into lines that fit the text column (a longer word stays whole); its leading spaces
    are kept, continuation lines indented."""
    body = text.lstrip(" ")
    lines = [text[:len(text) - len(body)]]
    for word in body.split(" "):
        if lines[-1].strip() and font.getlength(f"{lines[-1]} {word}") > TEXT_WIDTH:
            lines.append(CONTINUATION + word)
        else:
            lines[-1] = f"{lines[-1]} {word}" if lines[-1].strip() else lines[-1] + word
    return [(line, color) for line in lines]
