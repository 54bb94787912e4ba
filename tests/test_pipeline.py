"""End to end: the real dvc.yaml and stage scripts, run by `dvc repro` on tiny random models and a tiny dataset.

The repository's source files are copied into a fresh git repository, params.yaml is shrunk and pointed at tiny
model folders, and DVC runs as a user would run it (`pipeline_repo.py`, shared with benchmarks/incremental.py). This checks what unit tests cannot: that every stage's
deps/params/outs are declared right (nothing reruns without cause, a param change reruns exactly its dependants),
and that the stages hand each other files they can read.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image
from pipeline_repo import commit_all, init_pipeline_repo, make_tiny_repo, run, set_params, stages_run
from tiny_qformer import single_torch_thread  # noqa: F401 (autouse fixture)


RECORD_IMPORTS = Path(__file__).resolve().parent / "record_imports"
IMPORT_LOG = "imports.jsonl"  # beside the repository, not in it (it would be an untracked file there)

# Modules a stage imports whose changes cannot change its outputs, so they are no dvc dep of it (a dep reruns the
# stage, and what follows it, whenever the file changes). "*": any stage.
NOT_DEPS = {
    "*": {"vlm/artifacts.py": "where outputs go (paths) and how files are written whole, not what they hold",
          "vlm/config.py": "reads params.yaml; every value a stage uses is a DVC param of it"},
    "embed": {f"vlm/weights/{name}.py": "the weights stage's converters, imported with sources.py, not run here"
              for name in ("dinov2_onnx", "gguf_llm", "wheels")},
    "train_vlm": {"vlm/weights/wheels.py": "sha256_of, for the fingerprint that lets a killed run resume"},
    "evaluate": {"vlm/distributed.py": "the device to run on"},
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC repository holding this project's sources and tiny models, reproduced once and committed. The
    first reproduction records the project modules each stage's processes imported (`record_imports/`)."""
    root = tmp_path_factory.mktemp("pipeline")
    repo = make_tiny_repo(root / "repo")
    first = run(["dvc", "repro"], repo, env={"PYTHONPATH": str(RECORD_IMPORTS),
                                              "VLM_TEST_IMPORT_LOG": str(root / IMPORT_LOG)})
    assert stages_run(first) == ["data", "check", "weights", "embed", "train_qformer", "train_vlm", "evaluate"]
    commit_all(repo, "first reproduction")
    return repo


def test_every_project_module_a_stage_imports_is_a_dep_of_it(repo: Path) -> None:
    """A module a stage runs but does not list as a dep could change without `dvc repro` rerunning the stage:
    stale outputs that look current. Checked against what the stages really imported (lazy imports included),
    not a static guess."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    scripts = {}
    for name, stage in stages.items():
        script = next(word for word in stage["cmd"].split() if word.startswith("stages"))
        scripts[script if script.endswith(".py") else script.replace(".", "/") + ".py"] = name
    imported: dict[str, set[str]] = {name: set() for name in stages}
    for line in (repo.parent / IMPORT_LOG).read_text().splitlines():
        record = json.loads(line)
        stage = next((scripts[script] for arg in record["argv"] for script in scripts
                      if arg.endswith(script)), None)
        if stage is not None:  # DVC's own processes import nothing of the project
            imported[stage].update(record["files"])
    assert all(imported.values()), f"no imports recorded for some stages: {imported}"
    missing = {}
    for name, files in imported.items():
        deps = [str(dep) for dep in stages[name].get("deps", [])]
        exempt = NOT_DEPS["*"] | NOT_DEPS.get(name, {})
        uncovered = sorted(file for file in files if file not in exempt and not file.endswith("__init__.py")
                           and not any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps))
        if uncovered:
            missing[name] = uncovered
    assert missing == {}, f"modules the stages import but do not list in dvc.yaml deps: {missing}"


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
    # `check` holds num_queries against the data; its output (what the data holds) is unchanged, so `embed` stays
    assert stages_run(result) == ["check", "train_qformer", "train_vlm", "evaluate"]
    config = json.loads((repo / "models" / "vlm" / "qformer" / "qformer_config.json").read_text())
    assert config["num_queries"] == 2
    commit_all(repo, "two queries")


def test_experiment_run_and_metrics_diff(repo: Path) -> None:
    result = run(["dvc", "exp", "run", "-S", "qformer.num_queries=3"], repo)
    assert stages_run(result) == ["check", "train_qformer", "train_vlm", "evaluate"]
    assert "num_queries: 3" in (repo / "params.yaml").read_text()
    diff = run(["dvc", "metrics", "diff"], repo).stdout
    assert "metrics/train_qformer.json" in diff  # different queries, different losses
    experiments = run(["dvc", "exp", "show", "--csv"], repo).stdout
    assert "qformer.num_queries" in experiments
    # The gallery of the experiment (workspace) beside the committed one's, image by image.
    plots = json.loads(run(["dvc", "plots", "diff", "--json"], repo).stdout)["data"]
    first = plots["plots/gallery/test-000000.png"]
    assert {revision for entry in first for revision in entry["revisions"]} == {"HEAD", "workspace"}


# --------------------------------------------------------------------------- conversation sources, end to end

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SPLIT_SIZES = {"train": 4, "val": 1, "test": 2}


def llava_dataset(raw: Path) -> dict[str, object]:
    """LLaVA files (train as a JSON list, val and test as JSONL) of conversations about tiny colored squares, and
    a text-only record; the data params that read them."""
    folder = raw / "llava"
    for split, count in SPLIT_SIZES.items():
        records = [{"id": f"chat-{split}", "conversations": [{"from": "human", "value": "is there a square?"},
                                                             {"from": "gpt", "value": "no"}]}]
        for index in range(count):
            name, rgb = list(COLORS.items())[index % len(COLORS)]
            image = f"{split}-{index}.png"  # relative to data.llava.images
            (folder / "images").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40 + index, 32), rgb).save(folder / "images" / image)
            records.append({"id": f"{split}-{index}", "image": image, "conversations": [
                {"from": "human", "value": "<image>\nwhat color is the square?"}, {"from": "gpt", "value": name},
                {"from": "human", "value": "describe the image."}, {"from": "gpt", "value": f"a {name} square."}]})
        text = json.dumps(records) if split == "train" else "".join(json.dumps(r) + "\n" for r in records)
        (folder / f"{split}.{'json' if split == 'train' else 'jsonl'}").write_text(text)
    return {"source": "llava", "llava": {"images": "data/raw/llava/images", **{
        split: [f"data/raw/llava/{split}.{'json' if split == 'train' else 'jsonl'}"] for split in SPLIT_SIZES}}}


def hf_dataset(raw: Path) -> dict[str, object]:
    """Hugging Face datasets with an Image feature: train saved with save_to_disk, val and test as Parquet; a
    question and a LLaVA-style conversation a row, and captions (but in test); the data params that read them."""
    import datasets

    features = datasets.Features({
        "image": datasets.Image(), "captions": datasets.List(datasets.Value("string")),
        "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "messages": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")})})
    paths = {}
    for split, count in SPLIT_SIZES.items():
        rows = {name: [] for name in features}
        for index in range(count):
            name, rgb = list(COLORS.items())[index % len(COLORS)]
            buffer = io.BytesIO()
            Image.new("RGB", (40 + index, 32), rgb).save(buffer, format="PNG")
            rows["image"].append({"bytes": buffer.getvalue(), "path": None})
            # no test captions: scoring them would start Java (METEOR) for nothing this test checks
            rows["captions"].append(None if split == "test" else [f"a {name} square."])
            rows["question"].append("what color is the square?")
            rows["answer"].append(name)
            rows["messages"].append([{"from": "human", "value": "<image>\nwhat color is the square?"},
                                     {"from": "gpt", "value": name}])
        dataset = datasets.Dataset.from_dict(rows, features=features)
        paths[split] = f"data/raw/hf/{split}" + ("" if split == "train" else ".parquet")
        (raw / "hf").mkdir(parents=True, exist_ok=True)
        if split == "train":
            dataset.save_to_disk(str(raw.parent.parent / paths[split]))
        else:
            dataset.to_parquet(str(raw.parent.parent / paths[split]))
    return {"source": "hf", "hf": {**{split: [path] for split, path in paths.items()}, "caption_column": "captions",
                                   "question_column": "question", "answer_column": "answer",
                                   "conversations_column": "messages"}}


def test_conversation_sources_train_end_to_end(tmp_path: Path) -> None:
    """A LLaVA-format dataset, then a `datasets` one in the same repository, imported by `data` and trained through
    every stage (stage 2 on their conversations, each reply with its conversation's earlier turns). LLaVA's test
    split has nothing but conversations, which evaluation must take without a metric to compute. One repository
    for both keeps the test cheap: the second source reruns every stage but `weights`."""
    repo = tmp_path / "repo"
    repo.mkdir()
    init_pipeline_repo(repo)
    set_params(repo, {"data": llava_dataset(repo / "data" / "raw"), "train_qformer": {"batch_size": 4},
                      # no regions for the grid target; a few steps of everything
                      "train_vlm": {"batch_size": 4, "align": {"target": "caption", "steps": 2, "batch_size": 4},
                                    "grid": {"size": 0}}})
    commit_all(repo, "sources, tiny models, a LLaVA dataset")  # (the JSONL test tracks data/raw with `dvc add`)

    llava = run(["dvc", "repro"], repo)

    assert stages_run(llava) == ["data", "check", "weights", "embed", "train_qformer", "train_vlm", "evaluate"]
    assert "skipped 1 text-only LLaVA records" in llava.stdout + llava.stderr
    counts = json.loads((repo / "metrics" / "data.json").read_text())
    assert (counts["train_images"], counts["train_conversations"], counts["train_turns"]) == (4, 4, 8)
    assert (counts["test_captions"], counts["test_questions"], counts["test_conversations"]) == (0, 0, 2)
    assert json.loads((repo / "metrics" / "train_vlm.json").read_text())["turns_seen"] == 8  # 1 step of 4 images
    evaluation = json.loads((repo / "metrics" / "eval.json").read_text())
    assert evaluation == {"caption_images": 0, "question_images": 0}  # no caption, no question: no metric
    assert "evaluate: VQA accuracy not scored: no image of the split has questions" in llava.stdout + llava.stderr

    set_params(repo, {"data": hf_dataset(repo / "data" / "raw")})
    hf = run(["dvc", "repro"], repo)

    assert stages_run(hf) == ["data", "check", "embed", "train_qformer", "train_vlm", "evaluate"]
    counts = json.loads((repo / "metrics" / "data.json").read_text())
    assert (counts["train_images"], counts["train_captions"], counts["train_conversations"]) == (4, 4, 4)
    assert (counts["test_captions"], counts["test_questions"], counts["test_conversations"]) == (0, 2, 2)
    evaluation = json.loads((repo / "metrics" / "eval.json").read_text())
    assert 0.0 <= evaluation["vqa_accuracy"] <= 1.0 and "cider" not in evaluation
