"""Turn a GGUF language model (llama.cpp format) into a standard Hugging Face folder.

transformers can read GGUF files (`from_pretrained(..., gguf_file=...)`, needs the `gguf` package) and
dequantises the weights to float32. The resulting model still carries a GGUF quantization config and cannot be
saved as-is, so we rebuild a plain model of the same class from its config and state dict and save that.
After this the folder loads with `AutoModelForCausalLM` / `AutoTokenizer` alone, with no GGUF support.

Loading the tokenizer, the config and the weights each parse the whole file again, and the weights map rebuilds
gguf's tensor-name table once per tensor: 3 parses and ~400 tables for one file, most of the conversion's time.
`parse_once` makes those calls share one parsed reader and one table per architecture.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import gguf
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


@contextmanager
def parse_once() -> Iterator[None]:
    """Within this block, `gguf.GGUFReader` of one path and `gguf.get_tensor_name_map` of one architecture are
    built once and shared (transformers imports both from `gguf` at each call, so patching the module reaches
    every loader). A reader only reads its memory-mapped file, so sharing it changes no result."""
    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    @lru_cache(maxsize=None)
    def shared_reader(path, mode="r"):
        return original_reader(path, mode)

    gguf.GGUFReader = lambda path, mode="r": shared_reader(str(path), mode)
    gguf.get_tensor_name_map = lru_cache(maxsize=None)(original_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map


def _plain_copy(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """Same architecture and weights, without the GGUF quantization config attached to the loaded model."""
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain, loading_info = type(gguf_model).from_pretrained(
        None, config=config, state_dict=gguf_model.state_dict(), output_loading_info=True
    )
    problems = {kind: sorted(keys) for kind, keys in loading_info.items() if keys}
    if problems:
        raise ValueError(f"Rebuilding {type(gguf_model).__name__} from the GGUF weights failed: {problems}")
    return plain


def save_llm_from_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write the dequantised model of `gguf_path` into `out_dir` as an ordinary Hugging Face folder.

    The folder gets model.safetensors (float32), config.json, generation_config.json and the tokenizer files
    including the chat template. Tied input/output embeddings (SmolLM2 ties them) stay tied: the weight is stored
    once and `tie_word_embeddings` is kept in the config.
    `out_dir` is created; write into a temporary folder and rename it if you need the result to appear atomically.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    folder, filename = str(gguf_path.parent), gguf_path.name
    with parse_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        if not tokenizer.chat_template:
            raise ValueError(f"{gguf_path} has no chat template (tokenizer.chat_template metadata); "
                             "an instruction-tuned GGUF is required.")
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    model = _plain_copy(gguf_model)
    if model.config.tie_word_embeddings and (
            model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()):
        raise ValueError(f"{gguf_path}: config says the embeddings are tied but the rebuilt model has two copies.")
    model.generation_config = gguf_model.generation_config
    # GGUF tokenizers come with an "unlimited" max length; the context window is the honest limit.
    tokenizer.model_max_length = model.config.max_position_embeddings

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
