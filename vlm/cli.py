"""`vlm` command line: caption images or ask questions about them with the trained model.

Run from the repository root after `dvc repro`: the model comes from models/vlm, the frozen backbone from
models/base/vision, and prompts and image size from params.yaml (the same ones training used).
"""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from PIL import Image, UnidentifiedImageError

from vlm.artifacts import BASE_MODELS_DIR, VLM_DIR
from vlm.config import Params, load_params

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


class Assistant:
    """Backbone + trained VLM, loaded once: pixels in, text out."""

    def __init__(self, params: Params, model_dir: Path):
        from vlm.models.backbone import VisionBackbone
        from vlm.models.vlm import VisionLanguageModel

        self.params = params
        self.backbone = VisionBackbone.from_folder(BASE_MODELS_DIR / "vision", params.backbone.image_size)
        self.model = VisionLanguageModel.load(model_dir)

    @torch.inference_mode()
    def answer(self, images: list[Image.Image], instructions: list[str], beams: int) -> list[str]:
        embeds = self.backbone(self.backbone.preprocess(images)).float()
        return self.model.generate(embeds, instructions, self.params.eval.max_new_tokens, beams)


def _open_image(path: Path) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except FileNotFoundError:
        raise typer.BadParameter(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise typer.BadParameter(f"{path}: not a readable image ({err})") from None


def _assistant(params_file: Path, model_dir: Path) -> Assistant:
    if not (model_dir / "vlm_config.json").is_file():
        raise typer.BadParameter(f"{model_dir}: no trained model there; run `dvc repro` first")
    return Assistant(load_params(params_file), model_dir)


ParamsOption = typer.Option(Path("params.yaml"), "--params", help="params.yaml the model was trained with")
ModelOption = typer.Option(VLM_DIR, "--model", help="folder written by the train_vlm stage")


@app.command()
def caption(images: list[Path] = typer.Argument(..., help="image files"),
            beams: int = typer.Option(1, "--beams", min=1, help="beam width (1 = greedy)"),
            params_file: Path = ParamsOption, model_dir: Path = ModelOption) -> None:
    """Print a caption for each image."""
    assistant = _assistant(params_file, model_dir)
    opened = [_open_image(p) for p in images]
    captions = assistant.answer(opened, [assistant.params.llm.caption_prompt] * len(opened), beams)
    for path, text in zip(images, captions):
        typer.echo(f"{path}: {text}" if len(images) > 1 else text)


@app.command()
def ask(image: Path = typer.Argument(..., help="image file"),
        question: str = typer.Argument(..., help="a question about the image"),
        beams: int = typer.Option(1, "--beams", min=1, help="beam width (1 = greedy)"),
        params_file: Path = ParamsOption, model_dir: Path = ModelOption) -> None:
    """Answer a question about an image."""
    from vlm.train.stage2 import question_instruction

    assistant = _assistant(params_file, model_dir)
    instruction = question_instruction(question, assistant.params.llm)
    typer.echo(assistant.answer([_open_image(image)], [instruction], beams)[0])


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
