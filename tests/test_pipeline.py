"""End to end: the real dvc.yaml and stage scripts, run by `dvc repro` on tiny random models and a tiny dataset.

The repository's source files are copied into a fresh git repository, params.yaml is shrunk and pointed at tiny
model folders, and DVC runs as a user would run it. This checks what unit tests cannot: that every stage's
deps/params/outs are declared right (nothing reruns without cause, a param change reruns exactly its dependants),
and that the stages hand each other files they can read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_models import VISION_IMAGE_SIZE, tiny_bert, tiny_llm, tiny_vision
from tiny_qformer import single_torch_thread  # noqa: F401 (autouse fixture)

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RUNNING_STAGE = re.compile(r"Running stage '([^']+)'")
# A DVC command on this tiny pipeline takes well under a minute; the limit only stops a hung run.
COMMAND_TIMEOUT_S = 600

TINY_PARAMS = {
    "data": {"train_images": 24, "val_images": 4, "test_images": 6, "image_size": VISION_IMAGE_SIZE},
    "backbone": {"source": "tiny/vision", "image_size": VISION_IMAGE_SIZE, "batch_size": 8, "precision": "fp32"},
    # The tiny BERT has 32 position embeddings, so captions are truncated to 32 tokens.
    "qformer": {"bert": "tiny/bert", "num_queries": 4, "cross_attention_freq": 1, "embed_dim": 16,
                "max_text_len": 32},
    "projector": {"hidden_dim": 16},
    "lora": {"r": 4, "alpha": 8},
    "llm": {"source": "tiny/llm"},
    "train_qformer": {"epochs": 1, "batch_size": 8, "warmup_steps": 1, "log_every": 1, "precision": "fp32"},
    "train_vlm": {"epochs": 0.2, "batch_size": 8, "warmup_steps": 1, "log_every": 1, "precision": "fp32"},
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


def run(command: list[str], repo: Path) -> subprocess.CompletedProcess:
    """Run a command in `repo` as `make repro` would: venv first on PATH, Hugging Face Hub offline. The copy's
    own `vlm` package is put first on PYTHONPATH, so the stages run the code whose hashes DVC tracks (not the
    editable install in the original checkout). Bytecode writing stays on, as on a user's machine, so stray
    __pycache__ folders inside directory deps would show up as spurious reruns."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", PYTHONPATH=str(repo),
               DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert result.returncode == 0, (f"`{' '.join(command)}` failed with exit code {result.returncode}\n"
                                    f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def stages_run(result: subprocess.CompletedProcess) -> list[str]:
    return RUNNING_STAGE.findall(result.stdout + result.stderr)


def set_params(repo: Path, changes: dict[str, dict]) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


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


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC repository holding this project's sources and tiny models, reproduced once and committed."""
    repo = tmp_path_factory.mktemp("pipeline")
    init_pipeline_repo(repo)
    commit_all(repo, "sources, tiny models, tiny params")

    first = run(["dvc", "repro"], repo)
    assert stages_run(first) == ["data", "weights", "embed", "train_qformer", "train_vlm", "evaluate"]
    commit_all(repo, "first reproduction")
    return repo


def test_repro_runs_every_stage_and_writes_metrics(repo: Path) -> None:
    evaluation = json.loads((repo / "metrics" / "eval.json").read_text())
    for name in ("cider", "vqa_accuracy", "blind_cider", "blind_vqa_accuracy"):
        assert isinstance(evaluation[name], float) and 0.0 <= evaluation[name], name
    assert evaluation["visual_gain_vqa"] == evaluation["vqa_accuracy"] - evaluation["blind_vqa_accuracy"]
    stage1 = json.loads((repo / "metrics" / "train_qformer.json").read_text())
    assert stage1["steps"] == 3  # 1 epoch of 24 images in batches of 8
    stage2 = json.loads((repo / "metrics" / "train_vlm.json").read_text())
    assert stage2["steps"] >= 1 and stage2["trainable_lora"] > 0
    predictions = (repo / "predictions" / "test.jsonl").read_text().splitlines()
    assert {json.loads(line)["image_id"] for line in predictions} == {f"test-{i:06d}" for i in range(6)}
    # DVC keeps the generated files out of git: only sources, dvc.lock and the uncached metrics are tracked.
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, check=True, capture_output=True, text=True).stdout
    assert "dvc.lock" in tracked.split()
    generated = re.findall(r"^(?:data/dataset|data/embeddings|models|predictions)/.*$", tracked, re.MULTILINE)
    assert [path for path in generated if not path.endswith("/.gitignore")] == []
    assert "data/blank_embedding.parquet" not in tracked.split()


def test_gallery_is_listed_by_dvc_plots(repo: Path) -> None:
    """One PNG per test image (6 < eval.gallery_images), tracked by git (cache: false) and shown as image plots."""
    gallery = [f"plots/gallery/test-{i:06d}.png" for i in range(6)]
    assert sorted(str(p.relative_to(repo)) for p in (repo / "plots" / "gallery").iterdir()) == gallery
    tracked = subprocess.run(["git", "ls-files", "plots"], cwd=repo, check=True, capture_output=True,
                             text=True).stdout.split()
    assert tracked == gallery
    shown = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)["data"]
    assert set(gallery) <= set(shown)
    assert all(entry["type"] == "image" for path in gallery for entry in shown[path])


def test_second_repro_runs_nothing_even_without_bytecode_caches(repo: Path) -> None:
    # A fresh clone has no __pycache__ folders; they must not count as changed code deps.
    caches = list(repo.glob("vlm/**/__pycache__"))
    assert caches, "the stages should have written bytecode (PYTHONDONTWRITEBYTECODE is unset for them)"
    for cache in caches:
        shutil.rmtree(cache)
    result = run(["dvc", "repro"], repo)
    assert stages_run(result) == []


def test_changing_num_queries_reruns_exactly_its_dependants(repo: Path) -> None:
    set_params(repo, {"qformer": {"num_queries": 2}})
    result = run(["dvc", "repro"], repo)
    assert stages_run(result) == ["train_qformer", "train_vlm", "evaluate"]
    config = json.loads((repo / "models" / "vlm" / "qformer" / "qformer_config.json").read_text())
    assert config["num_queries"] == 2
    commit_all(repo, "two queries")


def test_experiment_run_and_metrics_diff(repo: Path) -> None:
    result = run(["dvc", "exp", "run", "-S", "qformer.num_queries=3"], repo)
    assert stages_run(result) == ["train_qformer", "train_vlm", "evaluate"]
    assert "num_queries: 3" in (repo / "params.yaml").read_text()
    diff = run(["dvc", "metrics", "diff"], repo).stdout
    assert "metrics/train_qformer.json" in diff  # different queries, different losses
    experiments = run(["dvc", "exp", "show", "--csv"], repo).stdout
    assert "qformer.num_queries" in experiments
    # The gallery of the experiment (workspace) beside the committed one's, image by image.
    plots = json.loads(run(["dvc", "plots", "diff", "--json"], repo).stdout)["data"]
    first = plots["plots/gallery/test-000000.png"]
    assert {revision for entry in first for revision in entry["revisions"]} == {"HEAD", "workspace"}
