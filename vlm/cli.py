"""`vlm` command line: caption images, ask questions about them or chat about one with the trained model; export it.

Run from the repository root after `dvc repro`: the model comes from models/vlm, the frozen backbone from
models/base/vision, and prompts and image size from params.yaml (the same ones training used). `--model` may also
name a folder written by `vlm export`, which holds all of that itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from PIL import Image, UnidentifiedImageError

from vlm.artifacts import BASE_MODELS_DIR, DATASET_DIR, METRICS_DIR, SPLITS, VLM_DIR
from vlm.config import ParamsError, load_params

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
def check(params_file: Path = typer.Option(Path("params.yaml"), "--params", help="the params to check"),
          dataset_dir: Path = typer.Option(DATASET_DIR, "--dataset", help="the data stage's output, if written")
          ) -> None:
    """Check that the params fit the data, in seconds: what each split holds, and every param that needs
    something the data lacks, with the fix. Reads the `data` stage's splits if they exist, else the annotations
    that `data.source` names (no image is read). The pipeline's `check` stage runs the same before `embed`."""
    from vlm.data.checks import DataMismatch, check_params, raise_on_fatal, summarize_split
    from vlm.data.imports import planned_summaries

    params = load_params(params_file)
    files = {split: dataset_dir / f"{split}.parquet" for split in SPLITS}
    if all(path.is_file() for path in files.values()):
        typer.echo(f"the data: {dataset_dir} (the data stage's output; rerun `dvc repro data` after changing data.*)")
        splits = {split: summarize_split(path) for split, path in files.items()}
    else:
        typer.echo(f"the data: data.source {params.data.source} (annotations only; {dataset_dir} is not written yet)")
        splits = planned_summaries(params.data)
    for split, summary in splits.items():
        typer.echo(f"  {split}: {summary.images} images, {summary.with_captions} with captions, "
                   f"{summary.with_questions} with questions, {summary.with_regions} with regions")
    try:
        raise_on_fatal(check_params(params, splits))
    except DataMismatch as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from None
    typer.echo("ok: the params fit the data")


@app.command()
def recipe(name: str = typer.Argument(..., help="a recipe in recipes/ (e.g. own-data) or a path to one"),
           params_file: Path = typer.Option(Path("params.yaml"), "--params", help="the params file to change")
           ) -> None:
    """Apply a recipe: set its values in params.yaml, comments kept (then `dvc exp run` or `dvc repro`)."""
    from vlm.recipes import apply_recipe, recipe_path

    try:
        path = recipe_path(name)
        changes = apply_recipe(path, params_file)
    except ParamsError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    for key, old, new in changes:
        typer.echo(f"  {key}: {old!r} -> {new!r}")
    typer.echo(f"{params_file}: {len(changes)} values changed by {path}" if changes
               else f"{params_file} already follows {path}")


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


CHAT_HELP = "Type a message and Enter. /image PATH: another image (new conversation); /reset: forget the " \
            "conversation; /quit: leave (so does end of input)."


@app.command()
def chat(image: Path = typer.Argument(..., help="image file to talk about"),
         temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy; higher = more varied"),
         top_p: float = typer.Option(1.0, "--top-p", help="sample among the likeliest tokens up to this probability"),
         max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="most tokens per reply"),
         seed: int | None = typer.Option(None, "--seed", help="seed for sampling (same seed, same replies)"),
         drop_oldest: bool = typer.Option(False, "--drop-oldest/--no-drop-oldest",
                                          help="when the conversation outgrows the LLM's context, forget its oldest "
                                               "turns (said each time) instead of refusing the message"),
         params_file: Path = ParamsOption, model_dir: Path = ModelOption) -> None:
    """Chat about an image in the terminal: each line read is a user turn, answered with the conversation so far.
    Commands: /image PATH, /reset, /quit. Reads standard input, so a file of lines can be piped in."""
    from vlm.messages import ContextError, Conversation, MessageError
    from vlm.models.sampling import Sampling

    try:
        sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    picture = _open_image(image)
    assistant = _assistant(params_file, model_dir)
    assistant.drop_oldest = drop_oldest
    turns: list[tuple[str, str]] = []
    typer.echo(CHAT_HELP)
    while True:
        typer.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line:  # end of input
            typer.echo()
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                turns = []
                typer.echo("(conversation forgotten)")
            elif command == "/image" and argument.strip():
                try:
                    picture = _open_image(Path(argument.strip()))
                except typer.BadParameter as error:
                    typer.echo(f"error: {error.message}", err=True)
                    continue
                turns = []
                typer.echo(f"(new image {argument.strip()}: a new conversation)")
            else:
                typer.echo(f"unknown command {text!r}. {CHAT_HELP}", err=True)
            continue
        try:
            conversation, dropped = assistant.fit(Conversation(None, picture, (*turns, (text, None))), max_tokens)
            pieces = assistant.chat_stream(conversation, sampling)
        except MessageError as error:
            hint = ""
            if isinstance(error, ContextError):
                hint = " (/reset starts over; --drop-oldest forgets old turns instead)"
            typer.echo(f"error: {error}{hint}", err=True)
            continue
        if dropped:
            turns = turns[dropped:]
            typer.echo(f"(forgot the {dropped} oldest turn(s) to fit the model's context)")
        reply = ""
        for piece in pieces:
            typer.echo(piece, nl=False)
            reply += piece
        typer.echo()
        turns.append((text, reply))


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
                                                help="a batch gathers requests until none came for this long "
                                                     "(at most ten times as long)"),
          model_name: str | None = typer.Option(None, "--model-name",
                                                help="the model id clients send (default: the model folder's name)"),
          drop_oldest: bool = typer.Option(False, "--drop-oldest/--no-drop-oldest",
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
