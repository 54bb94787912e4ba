"""The GPU path on tiny random models: embed, stage 1, query alignment, stage 2 and generation run on CUDA and
agree with the CPU.

    python benchmarks/gpu_smoke.py            # on a machine with a GPU; prints a table, exits 1 on a mismatch

Each case runs in a child process, once with the GPU hidden (CUDA_VISIBLE_DEVICES="") and once with it, so both
sides take the code path a user gets on that machine. fp32 runs must agree to rounding; the bf16 run (autocast,
what `precision: bf16` gives on a GPU) must train. Needs no dvc/dvclive (nothing is logged), so it also runs
where only torch, transformers, peft and pyarrow are installed. Not part of the test suite: CI has no GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def child(case: str, work: Path, precision: str) -> dict:
    import torch

    from vlm import distributed
    from vlm.embed import embed_split
    from vlm.data.embeddings import load_embeddings
    from vlm.models.backbone import VisionBackbone

    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    torch.backends.cudnn.allow_tf32 = False
    out: dict = {"device": str(distributed.device())}
    if case == "embed":
        backbone = VisionBackbone.from_folder(work / "vision", image_size=56).to(distributed.device())
        embed_split(backbone, work / "dataset.parquet", work / f"emb-{out['device']}", batch_size=8,
                    precision=precision, skip_bad_images=False)
        tokens = load_embeddings(work / f"emb-{out['device']}").tokens.float()
        out.update(sum=float(tokens.sum()), abs=float(tokens.abs().sum()))
        return out

    import train_worker
    from vlm.config import VLMTrainConfig
    from vlm.train.align import align_queries

    if case == "qformer":
        qformer, metrics = train_worker.run_qformer(work, None)
        out["param_device"] = str(next(qformer.parameters()).device)
        out.update(metrics)
        return out
    dataset = work / "dataset.parquet"
    torch.manual_seed(0)
    model = train_worker.VisionLanguageModel.create(work / "qformer", work / "llm", projector_hidden=16,
                                                    lora=train_worker.LORA, system_prompt="Answer about the image.")
    config = VLMTrainConfig(epochs=1.0, batch_size=4, lr=1e-3, projector_lr=1e-3, qformer_lr=1e-3,
                            warmup_steps=1, precision=precision, log_every=1, checkpoint_every=0)
    embeddings = train_worker.tiny_embeddings(dataset)
    # The query alignment first, as the stage runs it (it once indexed the LLM's embedding matrix on the CPU)
    align = replace(config.align, steps=3, target="caption", batch_size=4)
    out.update(align_queries(model, embeddings, dataset, replace(config, align=align), None))
    metrics = train_worker.train_vlm(model, embeddings, dataset, train_worker.LLMConfig(), config, None)
    out["param_device"] = str(next(p for p in model.parameters() if p.requires_grad).device)
    out["caption"] = model.generate(embeddings.tokens[:2].float(), ["Describe the image."] * 2, 6)
    out.update(metrics)
    return out


def run(case: str, work: Path, precision: str, gpu: bool) -> dict:
    paths = [str(REPO), str(REPO / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, __file__, "--child", case, str(work), precision], env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"{case} ({'gpu' if gpu else 'cpu'}, {precision}) failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    import torch

    from tiny_models import tiny_llm, tiny_vision
    from tiny_qformer import tiny_qformer
    from vlm.data.dataset_io import write_split
    from vlm.data.synthetic import generate_records

    if not torch.cuda.is_available():
        raise SystemExit("gpu_smoke: no CUDA device here; run it on a machine with a GPU.")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    write_split(generate_records(seed=3, num_images=16, image_size=56, id_prefix="train"), work / "dataset.parquet")
    tiny_qformer(work / "bert", num_queries=4, cross_attention_freq=1).save(work / "qformer")
    tiny_llm(work / "llm")
    tiny_vision(work / "vision")

    failures = []
    rows = []
    for case, key, tolerance in [("embed", "abs", 1e-4), ("qformer", "final_loss", 1e-3),
                                 ("vlm", "final_loss", 1e-3)]:
        cpu, gpu = run(case, work, "fp32", gpu=False), run(case, work, "fp32", gpu=True)
        relative = abs(cpu[key] - gpu[key]) / max(abs(cpu[key]), 1e-12)
        ok = relative <= tolerance and gpu["device"].startswith("cuda") and gpu.get("param_device", "cuda").startswith("cuda")
        rows.append((case, "fp32", cpu[key], gpu[key], relative, ok, gpu))
        failures += [] if ok else [case]
    for case in ("qformer", "vlm"):
        cpu, gpu = run(case, work, "fp32", gpu=False), run(case, work, "bf16", gpu=True)
        # bf16 only has to train: a finite loss within 10% of the fp32 one after the same steps.
        relative = abs(cpu["final_loss"] - gpu["final_loss"]) / cpu["final_loss"]
        ok = relative < 0.1
        rows.append((case, "bf16", cpu["final_loss"], gpu["final_loss"], relative, ok, gpu))
        failures += [] if ok else [f"{case}-bf16"]
    print(f"{'case':8} {'gpu prec':8} {'cpu fp32':>12} {'gpu':>12} {'rel diff':>9}  ok  details")
    for case, precision, cpu_value, gpu_value, relative, ok, details in rows:
        extra = {k: v for k, v in details.items() if k in ("device", "param_device", "caption", "steps")}
        print(f"{case:8} {precision:8} {cpu_value:12.6f} {gpu_value:12.6f} {relative:9.2e}  {'yes' if ok else 'NO '} {extra}")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], Path(sys.argv[3]), sys.argv[4])))
    else:
        sys.exit(main())
