"""Image files of an imported dataset: find one in a folder, read its encoded bytes (optionally shrunk).

Importers name an image by the paths it may have relative to a folder (COCO's `filepath/filename`, a JSONL
manifest's `image`) and, for COCO, by its numeric id. The id is the fallback for any layout: VQAv2 gives only ids,
and COCO files are named `COCO_train2014_000000057870.jpg` (2014) or `000000057870.jpg` (2017), in split
folders or not, so the folder is indexed once by the number that ends each file name.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlm.data.dataset_io import IMAGE_SIGNATURES

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
_TRAILING_NUMBER = re.compile(r"(\d+)$")
_JPEG_QUALITY = 95


class BadImage(Exception):
    """An image file is missing, empty or not a PNG/JPEG image; the message says which and why."""


class ImageFolder:
    """A folder of image files, found by relative path or by the COCO id at the end of their names."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._by_id: dict[int, Path] | None = None

    def find(self, names: Sequence[str], image_id: int | None = None) -> Path:
        """The first of `names` (relative to the folder) that exists, else the file whose name ends in
        `image_id`. Raises BadImage listing where it looked."""
        for name in names:
            path = self.root / name
            if path.is_file():
                return path
        if image_id is not None:
            found = self._index().get(image_id)
            if found is not None:
                return found
        looked = [str(self.root / name) for name in names]
        if image_id is not None:
            looked.append(f"any .jpg/.png file under {self.root} whose name ends in the number {image_id}")
        if not self.root.is_dir():
            raise BadImage(f"image folder {self.root} does not exist")
        raise BadImage("image file not found; looked for " + ", ".join(looked))

    def _index(self) -> dict[int, Path]:
        if self._by_id is None:
            self._by_id = {}
            for directory, subdirectories, files in os.walk(self.root):
                subdirectories.sort()  # a deterministic pick when two folders hold the same id (COCO 2014 and 2017)
                for name in sorted(files):
                    stem, suffix = os.path.splitext(name)
                    number = _TRAILING_NUMBER.search(stem)
                    if suffix.lower() in IMAGE_SUFFIXES and number:
                        self._by_id.setdefault(int(number.group(1)), Path(directory) / name)
        return self._by_id


def read_image(path: Path, resize: int = 0) -> bytes:
    """The file's encoded bytes, untouched when `resize` is 0 or the image already fits in resize x resize.

    Otherwise the image is shrunk (aspect ratio kept) to fit and re-encoded: JPEG stays JPEG, anything else
    becomes PNG. Raises BadImage for an empty file, one that is not PNG/JPEG (without `resize`) or that does
    not decode (with `resize`).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadImage(f"cannot read image file {path} ({exc.strerror or exc})") from exc
    return fit_image(data, resize, f"image file {path}")


def fit_image(data: bytes, resize: int, what: str) -> bytes:
    """Encoded image bytes as `read_image` returns a file's; `what` names them in a BadImage ("image file x")."""
    if not data:
        raise BadImage(f"{what} is empty")
    encoding = next((name for signature, name in IMAGE_SIGNATURES.items() if data.startswith(signature)), None)
    if resize == 0:
        if encoding is None:
            raise BadImage(f"{what} is neither PNG nor JPEG; convert it, or set data.resize to re-encode")
        return data
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"{what} does not decode ({exc})") from exc
    if encoding is not None and max(image.size) <= resize:
        return data
    image.thumbnail((resize, resize), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if encoding == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()
