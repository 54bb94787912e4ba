"""A copy of this repository as a fresh git + DVC repository with tiny random models and tiny params.

Shared by the end-to-end pipeline test (`test_pipeline.py`) and the incremental-experiment benchmark
(`benchmarks/incremental.py`): the repository's source files are copied into a new git repository, params.yaml
is shrunk and pointed at tiny model folders, and DVC runs there as a user would run it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from tiny_models import VISION_IMAGE_SIZE, tiny_bert, tiny_llm, tiny_vision

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RUNNING_STAGE = re.compile(r"Running stage '([^']+)'")
# A DVC command on this tiny pipeline takes well under a minute; the limit only stops a hung run.
COMMAND_TIMEOUT_S = 600

TINY_PARAMS = {
    "data": {"train_images": 24, "val_images": 4, "test_images": 6, "image_size": VISION_IMAGE_SIZE},
    "backbone": {"source": "tiny/vision", "image_size": VISION_IMAGE_SIZE, "layer": -2, "batch_size": 8,
                 "precision": "fp32"},
    # The tiny BERT has 32 position embeddings, so captions are truncated to 32 tokens.
    "qformer": {"bert": "tiny/bert", "num_queries": 4, "cross_attention_freq": 1, "embed_dim": 16,
                "max_text_len": 32},
    "projector": {"hidden_dim": 16},
    "lora": {"r": 4, "alpha": 8},
    "llm": {"source": "tiny/llm"},
    "train_qformer": {"epochs": 1, "batch_size": 8, "warmup_steps": 1, "log_every": 1, "precision": "fp32"},
    "train_vlm": {"epochs": 0.2, "batch_size": 8, "warmup_steps": 1, "log_every": 1, "precision": "fp32",
                  "align": {"steps": 3, "batch_size": 8, "warmup_steps": 1},
                  # grid size 1: one cell (the whole image), enough queries for any num_queries the tests set
                  "grid": {"size": 1}},
    "eval": {"batch_size": 16, "max_new_tokens": 4},
}


def pipeline_outputs(dvc_yaml: Path) -> list[str]:
    """Every path a stage writes (outs, metrics, plots) plus DVCLive's log folder: generated, never copied."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    paths = ["dvclive"]
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths


def source_files() -> list[str]:
    """The repository's tracked and untracked-but-not-ignored files, without pipeline outputs or dvc.lock."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout.split("\0")
    generated = pipeline_outputs(REPO_ROOT / "dvc.yaml")

    def is_generated(path: str) -> bool:
        return path == "dvc.lock" or any(path == out or path.startswith(out.rstrip("/") + "/") for out in generated)

    return [path for path in listed if path and not is_generated(path) and (REPO_ROOT / path).is_file()]


def run(command: list[str], repo: Path, env: dict[str, str] | None = None, check: bool = True
        ) -> subprocess.CompletedProcess:
    """Run a command in `repo` as `make repro` would: venv first on PATH, Hugging Face Hub offline. The copy's
    own `vlm` package is put first on PYTHONPATH, so the stages run the code whose hashes DVC tracks (not the
    editable install in the original checkout). Bytecode writing stays on, as on a user's machine, so stray
    __pycache__ folders inside directory deps would show up as spurious reruns. `env` adds variables; a
    PYTHONPATH there goes after the copy's own folder. `check`: fail the test unless the command succeeds."""
    extra = dict(env or {})
    full = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    python_path = os.pathsep.join(filter(None, [str(repo), extra.pop("PYTHONPATH", "")]))
    full.update(PATH=f"{VENV_BIN}{os.pathsep}{full.get('PATH', '')}", HF_HUB_OFFLINE="1", PYTHONPATH=python_path,
                DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1", **extra)
    result = subprocess.run(command, cwd=repo, env=full, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert result.returncode == 0 or not check, (f"`{' '.join(command)}` failed with exit code {result.returncode}\n"
                                    f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def stages_run(result: subprocess.CompletedProcess) -> list[str]:
    return RUNNING_STAGE.findall(result.stdout + result.stderr)


def set_params(repo: Path, changes: dict[str, dict]) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    _merge(params, changes)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _merge(params: dict, changes: dict) -> None:
    """Nested sections change key by key: {"train_vlm": {"align": {"target": ...}}} keeps align's other keys."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(params.get(key), dict):
            _merge(params[key], value)
        else:
            params[key] = value


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


def make_tiny_repo(repo: Path) -> Path:
    """This project's sources, tiny models and tiny params in a new git repository at `repo`, committed; not
    reproduced yet."""
    init_pipeline_repo(repo)
    commit_all(repo, "sources, tiny models, tiny params")
    return repo


def init_pipeline_repo(repo: Path) -> None:
    """Fill `repo` with this project's sources, tiny models and TINY_PARAMS, as a git repository (nothing committed
    yet, so a test can add its own data first)."""
    for path in source_files():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / path, repo / path)
    tiny_vision(repo / "tiny" / "vision")
    tiny_bert(repo / "tiny" / "bert")
    tiny_llm(repo / "tiny" / "llm")
    set_params(repo, TINY_PARAMS)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "Pipeline Test")  # repository-local: dvc exp run commits experiments
    git(repo, "config", "user.email", "pipeline-test@example.com")
