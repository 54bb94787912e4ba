"""Both training stages under torchrun (2 gloo processes) match one process; killed runs resume exactly;
the same seed gives the same run twice."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llm, training_modes
from tiny_qformer import single_torch_thread, tiny_qformer  # noqa: F401 (autouse fixture)
from train_worker import run_qformer, run_vlm

from vlm import distributed
from vlm.data.dataset_io import write_split
from vlm.data.synthetic import generate_records
from vlm.models.qformer import QFormer, QFormerLayer
from vlm.models.vlm import VisionLanguageModel
from vlm.train import stage1
from vlm.train.loop import NonFiniteLossError

WORKER = Path(__file__).with_name("train_worker.py")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Tiny dataset, BERT, Q-Former and LLM folders, shared by every run of this module."""
    root = tmp_path_factory.mktemp("work")
    write_split(generate_records(seed=3, num_images=16, image_size=32, id_prefix="train"), root / "dataset.parquet")
    tiny_qformer(root / "bert", num_queries=4, cross_attention_freq=1).save(root / "qformer")
    tiny_llm(root / "llm")
    return root


def logged(log_dir: Path, name: str = "loss") -> list[float]:
    with open(log_dir / "plots" / "metrics" / "train" / f"{name}.tsv") as f:
        return [float(row[name]) for row in csv.DictReader(f, delimiter="\t")]


def run_worker(stage: str, work: Path, log_dir: Path, nproc: int) -> None:
    command = [sys.executable, str(WORKER), stage, str(work), str(log_dir)]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   *command[1:]]
    python_path = os.pathsep.join([str(WORKER.parents[1]), str(WORKER.parent)])  # this checkout's vlm, then tests/
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("stage", ["qformer", "vlm"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(work, tmp_path, stage) -> None:
    run_worker(stage, work, tmp_path / "one", nproc=1)
    run_worker(stage, work, tmp_path / "two", nproc=2)
    one, two = logged(tmp_path / "one"), logged(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert one[0] != one[-1]  # it trained, so the later steps compare updated weights
    assert one == pytest.approx(two, abs=1e-4)


def test_two_gloo_processes_give_the_gradient_of_one_process(work, tmp_path) -> None:
    """Stricter than the loss curves: every parameter's gradient of one global batch (ITC over the gathered
    batch + ITG), averaged over 2 ranks, equals the single-process gradient."""
    run_worker("qformer-gradients", work, tmp_path / "one", nproc=1)
    run_worker("qformer-gradients", work, tmp_path / "two", nproc=2)
    one = torch.load(tmp_path / "one" / "gradients.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "gradients.pt", weights_only=True)
    assert one.keys() == two.keys() and any(".text_ffn." in name for name in one)
    # One relative error over all gradients: single tiny gradients (e.g. the temperature's, a near-cancelling sum
    # while the tiny model's ITC sits at chance) carry float noise of a few percent. Measured: 4e-7; with
    # torch.distributed.nn's all_gather, whose gloo backward got the text features wrong, 3e-3.
    error = sum(float((two[name] - one[name]).norm() ** 2) for name in one) ** 0.5
    scale = sum(float(gradient.norm() ** 2) for gradient in one.values()) ** 0.5
    assert error < 1e-5 * scale


class Interrupt(Exception):
    """Stands in for a kill: raised from inside a training step."""


def interrupt_at(call: int, function):
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise Interrupt
        return function(*args, **kwargs)
    return wrapped


def crash_qformer_run(work: Path, log_dir: Path, checkpoints: Path, monkeypatch) -> None:
    """A stage-1 run with checkpoints every 2 steps that dies inside step 4 (after step 2's checkpoint)."""
    with monkeypatch.context() as patch:
        patch.setattr(stage1, "stage1_losses", interrupt_at(4, stage1.stage1_losses))
        with pytest.raises(Interrupt):
            run_qformer(work, log_dir, checkpoints, checkpoint_every=2)


def test_a_killed_qformer_run_resumes_to_the_same_weights_and_curves(work, tmp_path, monkeypatch) -> None:
    reference, reference_metrics = run_qformer(work, tmp_path / "ref")
    checkpoints = tmp_path / "checkpoints"
    crash_qformer_run(work, tmp_path / "run", checkpoints, monkeypatch)
    assert (checkpoints / "last.pt").is_file()  # step 2's checkpoint survived the crash
    resumed, resumed_metrics = run_qformer(work, tmp_path / "run", checkpoints, checkpoint_every=2)
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed_metrics == reference_metrics
    assert logged(tmp_path / "run") == logged(tmp_path / "ref")  # replayed history + new steps = one curve
    assert not checkpoints.exists()  # a finished run cleans up after itself


def test_a_killed_vlm_run_resumes_to_the_same_weights(work, tmp_path, monkeypatch) -> None:
    reference, _ = run_vlm(work, tmp_path / "ref")
    checkpoints = tmp_path / "checkpoints"
    with monkeypatch.context() as patch:
        patch.setattr(VisionLanguageModel, "forward", interrupt_at(3, VisionLanguageModel.forward))
        with pytest.raises(Interrupt):
            run_vlm(work, tmp_path / "run", checkpoints, checkpoint_every=2)
    resumed, _ = run_vlm(work, tmp_path / "run", checkpoints, checkpoint_every=2)
    trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
    reference_state, resumed_state = reference.state_dict(), resumed.state_dict()
    changed = 0
    for name, value in reference_state.items():
        assert torch.equal(value, resumed_state[name]), name
        changed += name in trainable
    assert changed > 0
    assert logged(tmp_path / "run") == logged(tmp_path / "ref")


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(work, tmp_path,
                                                                                 monkeypatch) -> None:
    calls = {"n": 0}
    real = stage1.stage1_losses

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:  # step index 3
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(stage1, "stage1_losses", poisoned)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 3.*last good checkpoint is .*last\.pt"):
        run_qformer(work, tmp_path / "run", checkpoints, checkpoint_every=2)
    assert torch.load(checkpoints / "last.pt", weights_only=True)["step"] == 2


def test_a_checkpoint_of_another_run_is_not_resumed(work, tmp_path, monkeypatch, capsys) -> None:
    checkpoints = tmp_path / "checkpoints"
    crash_qformer_run(work, tmp_path / "run", checkpoints, monkeypatch)
    # Same stage, other params (checkpoint_every is part of the run's params): a fresh start, not a resume.
    _, metrics = run_qformer(work, tmp_path / "other", checkpoints, checkpoint_every=3)
    assert "different run" in capsys.readouterr().out
    assert len(logged(tmp_path / "other")) == 4


def test_the_same_seed_gives_the_same_run_twice(work, tmp_path) -> None:
    first, first_metrics = run_qformer(work, tmp_path / "a")
    second, second_metrics = run_qformer(work, tmp_path / "b")
    assert first_metrics == second_metrics
    assert logged(tmp_path / "a") == logged(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_each_process_computes_on_its_own_gpu_or_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.device() == torch.device("cuda", 1)


def test_a_zero_qformer_lr_freezes_the_qformer_and_trains_the_rest(work) -> None:
    import train_worker

    before = QFormer.load(work / "qformer").state_dict()
    recorded = {}  # "modes": whether the Q-Former ran in training mode (dropout on), at each stage-2 step
    model, _ = train_worker.run_vlm(work, None, qformer_lr=0.0,
                                    before_training=lambda model: recorded.update(modes=training_modes(model.qformer)))
    modes = recorded["modes"]
    after = model.qformer.state_dict()
    assert all(torch.equal(before[name], after[name].cpu()) for name in before)
    assert modes and not any(modes), "a frozen Q-Former must run in eval mode (no dropout) in stage 2"
    assert not any(p.requires_grad for p in model.qformer.parameters())
    counts = model.trainable_parameter_counts()
    assert counts["trainable_qformer"] == 0 and counts["trainable_projector"] > 0 and counts["trainable_lora"] > 0


@pytest.mark.parametrize("dropout", [False, True])
def test_stage1_dropout_decides_whether_the_qformer_trains_in_training_mode(work, dropout: bool) -> None:
    modes = []  # the `training` flag of every Q-Former layer call (training mode is what turns dropout on)

    def record(module, args, output) -> None:
        if isinstance(module, QFormerLayer):
            modes.append(module.training)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        run_qformer(work, None, dropout=dropout)
    finally:
        handle.remove()
    assert modes and set(modes) == {dropout}


def test_new_lr_trains_the_parts_bert_lacks_at_their_own_rate(work) -> None:
    # Pretrained parts at a negligible rate in both runs; the new parts (cross-attention, queries, heads) fast in one.
    fast, _ = run_qformer(work, None, lr=1e-9, new_lr=1e-2)
    slow, _ = run_qformer(work, None, lr=1e-9, new_lr=1e-9)
    new = {id(p) for p in fast.new_parameters()}
    slow_parameters = dict(slow.named_parameters())
    change = {name: float((p - slow_parameters[name]).detach().abs().max()) for name, p in fast.named_parameters()}
    moved_new = max(change[name] for name, p in fast.named_parameters() if id(p) in new)
    moved_pretrained = max(change[name] for name, p in fast.named_parameters() if id(p) not in new)
    assert moved_new > 1e-3 and moved_pretrained < 1e-6, (moved_new, moved_pretrained)
