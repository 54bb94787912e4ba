"""Turn a GGUF language model (llama.cpp format) into a standard Hugging Face folder.

transformers can read GGUF files (`from_pretrained(..., gguf_file=...)`, needs the `gguf` package) and
dequantises the weights to float32. The resulting model still carries a GGUF quantization config and cannot be
saved as-is, so we rebuild a plain model of the same class from its config and state dict and save that.
After this the folder loads with `AutoModelForCausalLM` / `AutoTokenizer` alone, with no GGUF support.
"""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


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
