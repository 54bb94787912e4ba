"""`vlm` command line: caption images or ask questions about them with the trained model; export it.

Run from the repository root after `dvc repro`: the model comes from models/vlm, the frozen backbone from
models/base/vision, and prompts and image size from params.yaml (the same ones training used). `--model` may also
name a folder written by `vlm export`, which holds all of that itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from PIL import Image, UnidentifiedImageError

from vlm.artifacts import BASE_MODELS_DIR, METRICS_DIR, VLM_DIR
from vlm.config import load_params

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _open_image(path: Path) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except FileNotFoundError:
        raise typer.BadParameter(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise typer.BadParameter(f"{path}: not a readable image ({err})") from None


def _assistant(params_file: Path, model_dir: Path):
    from vlm.assistant import Assistant
    from vlm.export import EXPORT_CONFIG, load

    if (model_dir / EXPORT_CONFIG).is_file():
        return load(model_dir)
    if not (model_dir / "vlm_config.json").is_file():
        raise typer.BadParameter(f"{model_dir}: no trained model there; run `dvc repro` first")
    return Assistant.from_pipeline(load_params(params_file), model_dir)


ParamsOption = typer.Option(Path("params.yaml"), "--params", help="params.yaml the model was trained with")
ModelOption = typer.Option(VLM_DIR, "--model", help="folder written by the train_vlm stage or by `vlm export`")


@app.command()
def caption(images: list[Path] = typer.Argument(..., help="image files"),
            beams: int = typer.Option(1, "--beams", min=1, help="beam width (1 = greedy)"),
            params_file: Path = ParamsOption, model_dir: Path = ModelOption) -> None:
    """Print a caption for each image."""
    assistant = _assistant(params_file, model_dir)
    captions = assistant.caption([_open_image(p) for p in images], beams)
    for path, text in zip(images, captions):
        typer.echo(f"{path}: {text}" if len(images) > 1 else text)


@app.command()
def ask(image: Path = typer.Argument(..., help="image file"),
        question: str = typer.Argument(..., help="a question about the image"),
        beams: int = typer.Option(1, "--beams", min=1, help="beam width (1 = greedy)"),
        params_file: Path = ParamsOption, model_dir: Path = ModelOption) -> None:
    """Answer a question about an image."""
    typer.echo(_assistant(params_file, model_dir).ask(_open_image(image), question, beams))


@app.command()
def export(out_dir: Path = typer.Argument(..., help="folder to write the model into"),
           merge: bool = typer.Option(True, "--merge/--no-merge",
                                      help="fold the LoRA into the LLM's weights, or keep it as a peft adapter"),
           params_file: Path = ParamsOption,
           model_dir: Path = typer.Option(VLM_DIR, "--model", help="folder written by the train_vlm stage"),
           vision_dir: Path = typer.Option(BASE_MODELS_DIR / "vision", "--vision", help="backbone folder"),
           metrics_file: Path = typer.Option(METRICS_DIR / "eval.json", "--metrics",
                                             help="metrics for the model card (skipped if absent)")) -> None:
    """Write one self-contained folder: backbone, Q-Former, projector, LLM (LoRA merged or as adapter), a model
    card with the evaluation metrics. Load it with `vlm.load(OUT_DIR)` or `vlm caption --model OUT_DIR`."""
    from vlm.export import export as export_model

    if not (model_dir / "vlm_config.json").is_file():
        raise typer.BadParameter(f"{model_dir}: no trained model there; run `dvc repro` first")
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    if metrics is None:
        typer.echo(f"{metrics_file} not found: the model card will have no metrics", err=True)
    try:
        export_model(out_dir, load_params(params_file), merge, model_dir, vision_dir, metrics)
    except (FileExistsError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error)) from None
    typer.echo(out_dir)


@app.command()
def serve(params_file: Path = ParamsOption, model_dir: Path = ModelOption,
          host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (loopback only by default)"),
          port: int = typer.Option(8000, "--port", min=0, max=65535),
          api_key: str | None = typer.Option(None, "--api-key", envvar="VLM_API_KEY",
                                             help="require `Authorization: Bearer KEY` on every /v1 route"),
          allow_images_from: Path | None = typer.Option(None, "--allow-images-from", file_okay=False, exists=True,
                                                        help="a folder whose image files requests may name by "
                                                             "path (default: data: URLs only)"),
          max_batch: int = typer.Option(16, "--max-batch", min=1, help="most requests decoded in one batch"),
          batch_window_ms: float = typer.Option(20.0, "--batch-window-ms", min=0.0,
                                                help="how long the first request of a batch waits for others"),
          model_name: str | None = typer.Option(None, "--model-name",
                                                help="the model id clients send (default: the model folder's name)"),
          drop_oldest: bool = typer.Option(False, "--drop-oldest",
                                           help="drop a conversation's oldest turns to fit the context (the answer's "
                                                "X-VLM-Dropped-Turns header counts them) instead of a 400")
          ) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models) with a chat page at
    /. Concurrent requests are decoded together in batches."""
    import uvicorn

    from vlm.messages import ImagePolicy
    from vlm.serve.app import create_app
    from vlm.serve.scheduler import BatchScheduler

    images = ImagePolicy(allowed_dir=allow_images_from.resolve() if allow_images_from else None)
    model_id = model_name or model_dir.resolve().name
    assistant = _assistant(params_file, model_dir)
    assistant.drop_oldest = drop_oldest
    scheduler = BatchScheduler(assistant, max_batch, batch_window_ms / 1000)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host} without --api-key: anyone who reaches it can use the model",
                   err=True)
    typer.echo(f"serving {model_id} on http://{host}:{port} (OpenAI API at /v1)", err=True)
    uvicorn.run(create_app(scheduler, model_id, api_key, images), host=host, port=port, log_level="info")


@app.command("extract-images")
def extract_images(out_dir: Path = typer.Argument(..., help="folder to write PNG files into"),
                   split: str = typer.Option("test", help="dataset split (train, val, test)"),
                   count: int = typer.Option(4, min=1, help="how many images")) -> None:
    """Write the first images of a dataset split as files, to try `caption` and `ask` on."""
    from vlm.artifacts import DATASET_DIR
    from vlm.data.dataset_io import decode_image, iter_split

    out_dir.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(iter_split(DATASET_DIR / f"{split}.parquet", columns=["image_id", "image"])):
        if i == count:
            break
        path = out_dir / f"{row['image_id']}.png"
        decode_image(row["image"], row["image_id"]).save(path)
        typer.echo(path)


if __name__ == "__main__":
    app()
