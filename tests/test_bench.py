"""The benchmark harness computes what it claims: ratios, goals, the flat JSON, and the FLOP counts of a stage-2
step (checked against torch's own FlopCounterMode and the packing's real attention mask), on tiny inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llm
from tiny_qformer import IMAGE_WIDTH, single_torch_thread, tiny_qformer  # noqa: F401 (autouse fixture)
from torch.utils.flop_counter import FlopCounterMode

import vlm.models.vlm
from vlm.config import LoraConfig
from vlm.models.packing import PADDING, pack, turn_attention_mask
from vlm.models.prompt import Example
from vlm.models.vlm import VisionLanguageModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.flops import (  # noqa: E402
    MatmulProbe,
    attention_flops,
    causal_pairs,
    linear_flops,
    matmul_peak,
    packed_pairs,
    vlm_step_flops,
)
from benchmarks.harness import Figure, rate_ratio, ratio, side_by_side, write_json  # noqa: E402


def test_ratios() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert rate_ratio(100, 2.0, 50, 2.0) == 2.0  # 50 items/s over 25 items/s
    assert rate_ratio(10, 1.0, 10, 4.0) == 4.0   # same work in a quarter of the time
    with pytest.raises(ValueError):
        ratio(1.0, 0.0)


def test_side_by_side_alternates_and_keeps_each_sides_best() -> None:
    calls: list[str] = []
    first, second = side_by_side(lambda: calls.append("a"), lambda: calls.append("b"), repeats=3)
    assert calls == ["a", "b"] * 3
    assert first >= 0 and second >= 0


def test_figure_goals_and_flat_json(tmp_path: Path) -> None:
    assert Figure("x", "x", 0.95, ">= 0.9").met() is True
    assert Figure("x", "x", 1.3, "<= 1.2").met() is False
    assert Figure("x", "x", 0, "== 0").met() is True
    assert Figure("x", "x", 0.3, None).met() is None
    figure = Figure("embed", "t", 0.91234567, ">= 0.9", details={"images": 8, "stage_s": 1.234567})
    written = write_json(tmp_path / "bench.json", [figure], {"cpu": "test"})
    assert json.loads((tmp_path / "bench.json").read_text()) == written == {
        "machine_cpu": "test", "embed_ratio": 0.9123, "embed_goal": ">= 0.9", "embed_goal_met": True,
        "embed_images": 8, "embed_stage_s": 1.2346}


def test_linear_and_attention_rules() -> None:
    assert linear_flops(10, 3, weight_grad=True, input_grad=True) == 6 * 10 * 3    # trained
    assert linear_flops(10, 3, weight_grad=False, input_grad=True) == 4 * 10 * 3   # frozen, gradient flows through
    assert linear_flops(10, 3, weight_grad=True, input_grad=False) == 4 * 10 * 3   # trained, reads a constant
    assert linear_flops(10, 3, weight_grad=False, input_grad=False) == 2 * 10 * 3  # inference
    assert attention_flops(pairs=5, width=4, backward=False) == 2 * (2 * 4 * 5)   # scores + weighted sum
    assert attention_flops(pairs=5, width=4) == 3 * attention_flops(5, 4, backward=False)
    assert causal_pairs(4) == 1 + 2 + 3 + 4


def test_packed_pairs_are_the_pairs_the_packing_mask_allows() -> None:
    prefix, visual = (7, 8, 9), 2
    rows = [[Example((1, 2), (3,)), Example((4,), (5, 6, 6))], [Example((1,), (2,))]]
    layout = pack(prefix, visual, rows, pad_id=0, left_pad=False)
    allowed = turn_attention_mask(layout.segments, "sdpa", torch.float32)[:, 0]  # [B, L, L]
    real_queries = layout.segments != PADDING
    shared = len(prefix) + visual
    expected = sum(packed_pairs(shared, [len(t.user_ids) + len(t.answer_ids) for t in turns]) for turns in rows)
    assert int(allowed[real_queries].sum()) == expected


@pytest.mark.parametrize("frozen_qformer", [False, True], ids=["qformer-trains", "qformer-frozen"])
def test_step_flops_match_torch_flop_counter_on_a_tiny_vlm(tmp_path: Path, frozen_qformer: bool,
                                                         monkeypatch) -> None:
    """Every linear layer of a training step (LLM with LoRA, LM head on answer tokens, Q-Former image path,
    projector), forward and backward, against FlopCounterMode's count of the matmuls that really ran, with the
    Q-Former trained or frozen as train_vlm freezes it (qformer_lr 0). The rows have equal lengths and are not
    padded to a multiple (model FLOPs count real tokens only), so no padding makes the two differ."""
    monkeypatch.setattr(vlm.models.vlm, "TRAIN_LENGTH_MULTIPLE", 1)
    tiny_qformer(tmp_path / "bert", num_queries=4, cross_attention_freq=2).save(tmp_path / "qformer")
    tiny_llm(tmp_path / "llm")
    torch.manual_seed(0)
    model = VisionLanguageModel.create(tmp_path / "qformer", tmp_path / "llm", projector_hidden=16,
                                       lora=LoraConfig(r=4, alpha=8, dropout=0.0), system_prompt="Answer.")
    model.train()
    if frozen_qformer:
        model.qformer.requires_grad_(False)
    turns = [model.prompt.example("how many objects are there?", "two"),
             model.prompt.example("Describe the image.", "a red circle left of a blue square")]
    rows = [turns, turns[::-1]]
    image_tokens = 5
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(len(rows), image_tokens, IMAGE_WIDTH), rows).backward()
    ran = counter.get_flop_counts()["Global"]
    linear_ran = sum(flops for op, flops in ran.items() if str(op) in ("aten.mm", "aten.addmm"))
    counted = vlm_step_flops(model, image_tokens, rows)
    assert counted.linear == linear_ran
    assert counted.target_tokens == 2 * sum(len(t.answer_ids) for t in turns)
    assert counted.total > counted.linear  # plus attention, which FlopCounterMode does not see in CPU SDPA


def test_matmul_peak_reports_flops_of_the_size_it_timed() -> None:
    flops, size = matmul_peak(torch.float32, repeats=1, min_seconds=0.0, max_size=128)
    assert size == 128 and flops > 0


def test_matmul_probe_takes_one_timed_sample_a_call() -> None:
    probe = MatmulProbe(torch.float32, size=64)
    with pytest.raises(ValueError, match="no samples"):
        probe.median()
    for _ in range(3):
        probe()
    assert len(probe.rates) == 3 and probe.seconds > 0
    assert min(probe.rates) <= probe.median() <= max(probe.rates)
    assert probe.median() == sorted(probe.rates)[1]


def test_profile_summary_gives_each_sample_to_the_first_matching_label() -> None:
    from benchmarks.profile_summary import summarise

    lines = ["main (a.py:1);train (loop.py:9);VisionBackbone.forward (backbone.py:5) 3",
             "main (a.py:1);train (loop.py:9);backward (torch.py:2) 2",
             "main (a.py:1);idle (a.py:3) 1",
             "not a stack line"]
    counts = summarise(lines, [("backbone", "VisionBackbone.forward"), ("training", "train")])
    assert counts == {"backbone": 3, "training": 2, "other": 1}
    both = summarise(lines, [("train+backward", "train&backward"), ("main", "main")])
    assert both == {"train+backward": 2, "main": 4, "other": 0}


def test_peak_rss_is_the_childs_own_not_the_parents() -> None:
    """getrusage's ru_maxrss of a child started by subprocess reports the parent's peak; peak_rss_mib must not."""
    import subprocess

    from benchmarks.harness import peak_rss_mib, rss_mib

    parent = peak_rss_mib()  # this process has imported torch and transformers: hundreds of MiB
    child = subprocess.run([sys.executable, "-c", "from benchmarks.harness import peak_rss_mib; print(peak_rss_mib())"],
                           cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True)
    assert 0 < float(child.stdout) < parent / 2
    now = rss_mib()
    assert 0 < now <= peak_rss_mib()


def test_forward_clock_times_each_kind_of_call() -> None:
    from benchmarks.harness import ForwardClock

    layer = torch.nn.Linear(4, 4)
    clock = ForwardClock(layer, lambda args, kwargs: "many" if args[0].shape[0] > 1 else "one")
    layer(torch.zeros(3, 4))
    layer(torch.zeros(1, 4))
    layer(torch.zeros(1, 4))
    assert dict(clock.calls) == {"many": 1, "one": 2}
    assert set(clock.seconds) == {"many", "one"} and all(s >= 0 for s in clock.seconds.values())
    clock.remove()
    layer(torch.zeros(1, 4))
    assert clock.calls["one"] == 2


# ------------------------------------------------------------------------------------------- layer probe


def test_layer_probe_labels_are_the_scene_truth() -> None:
    from benchmarks.layer_probe import scene_labels
    from vlm.data.synthetic import COLORS, SHAPES, image_rng, sample_scene, scene_record

    for index in range(20):
        rng = image_rng(7, index)
        scene = sample_scene(rng, 1, 4)
        record = scene_record(scene, rng, f"x-{index}", 32)
        colours, shapes, count = scene_labels(record)
        assert colours == [float(any(o.color == c for o in scene.objects)) for c in COLORS]
        assert shapes == [float(any(o.shape == s for o in scene.objects)) for s in SHAPES]
        assert count in (-1, len(scene.objects))


def test_layer_probe_separates_what_is_separable_and_not_noise() -> None:
    from benchmarks.layer_probe import probe_accuracy

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 8, generator=generator)
    signal = (features[:, :2] > 0).float()  # labels written in the features
    noise = (torch.rand(400, 2, generator=generator) > 0.5).float()
    assert probe_accuracy(features, signal, 300, multilabel=True) > 0.9
    assert probe_accuracy(features, noise, 300, multilabel=True) < 0.45  # chance for two labels: 0.25


def test_layer_probe_runs_each_layer_of_a_tiny_backbone(tmp_path: Path) -> None:
    from tiny_models import VISION_IMAGE_SIZE, tiny_vision

    from benchmarks.layer_probe import parse_layer, probe
    from vlm.data.dataset_io import write_split
    from vlm.data.synthetic import generate_records

    dataset = tmp_path / "train.parquet"
    write_split(generate_records(seed=1, num_images=16, image_size=VISION_IMAGE_SIZE, id_prefix="train"), dataset)
    results = probe(tiny_vision(tmp_path / "vision"), dataset, [-2, -1, parse_layer("-2,-1")], images=16,
                    image_size=VISION_IMAGE_SIZE)
    assert set(results) == {-2, -1, (-2, -1)}
    for scores in results.values():
        assert set(scores) == {"colour_set", "shape_set", "count"}
        assert all(0.0 <= value <= 1.0 for value in scores.values())


# ------------------------------------------------------------------------------------------- patch probe


def test_patch_probe_labels_each_patch_with_the_colour_under_it() -> None:
    from benchmarks.patch_probe import patch_labels
    from vlm.data.synthetic import COLORS, Scene, SceneObject, render_scene

    colours = list(COLORS)
    # A large square centred on patch (1, 1) of a 4 x 4 grid (its centre at 3/8 of the canvas both ways), and a
    # small circle centred on patch (3, 2).
    scene = Scene((SceneObject("green", "square", "large", 0.375, 0.375),
                   SceneObject("purple", "circle", "small", 0.625, 0.875)))
    labels = patch_labels(render_scene(scene, 224), grid=4, image_size=112).reshape(4, 4)
    assert labels[1, 1] == 1 + colours.index("green")
    assert labels[3, 2] == 1 + colours.index("purple")
    assert labels[0, 3] == 0 and labels[3, 0] == 0  # corners far from both objects: background
    assert set(labels.flatten().tolist()) == {0, 1 + colours.index("green"), 1 + colours.index("purple")}


# ------------------------------------------------------------------------------------------- serving


def test_serving_benchmark_runs_both_sides_through_the_server(tmp_path: Path) -> None:
    """Benchmark 7 on a tiny exported model (its --quick sizes): every request answered on both sides, the
    scheduler counted its batches, and the ratio is the two sides' token rates."""
    from tiny_models import tiny_export

    import vlm
    from benchmarks.serving import run

    figure = run(vlm.load(tiny_export(tmp_path)), requests=8, clients=4, max_tokens=4, image_size=48)
    details = figure.details
    assert figure.key == "serving" and figure.goal == ">= 5"
    assert details["single_requests"] == 8  # far inside the time limit
    assert 8 <= details["concurrent_tokens"] <= 8 * 4 and 8 <= details["single_tokens"] <= 8 * 4
    assert 1 <= details["batches"] <= 8 and details["largest_batch"] <= 4
    assert details["concurrent_p50_s"] <= details["concurrent_p95_s"]
    assert details["single_p50_s"] <= details["single_p95_s"]
    assert figure.value == pytest.approx(rate_ratio(details["concurrent_tokens"], details["concurrent_s"],
                                                    details["single_tokens"], details["single_s"]))
    assert "serving_ratio" in figure.flat() and figure.flat()["serving_goal"] == ">= 5"
