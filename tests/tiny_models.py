"""Tiny random stand-ins for the three base models, written as standard Hugging Face folders.

They load exactly like the real ones (AutoModel / AutoTokenizer from a folder, offline), so the pipeline and the
VLM can be tested end to end in seconds without any download. Weights are random: tests built on them check
plumbing (shapes, masks, persistence, DVC wiring), never quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_qformer import IMAGE_WIDTH, tiny_qformer, write_tiny_bert
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vlm.config import LLMConfig, LoraConfig, load_params
from vlm.data.synthetic import ask_questions, image_rng, sample_scene, write_captions
from vlm.models.cell_labels import SPARE_LABEL, cell_names
from vlm.models.vlm import VisionLanguageModel
from vlm.weights.sources import HF_PREPROCESSOR_CONFIG

REPO_ROOT = Path(__file__).resolve().parents[1]

VISION_IMAGE_SIZE = 56  # 4 x 4 patches of 14 px + CLS = 17 tokens
VISION_WIDTH = 32

# The tiny VLM (`tiny_vlm`): a Q-Former over IMAGE_WIDTH-wide image tokens, the tiny Llama, a small LoRA.
TINY_VLM_SYSTEM_PROMPT = "Answer about the image."
TINY_VLM_QUERIES, TINY_VLM_IMAGE_TOKENS = 4, 5
TINY_VLM_LORA = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))

# The same special-token layout as SmolLM2-135M-Instruct: unk 0, bos 1, eos 2, and padding with the EOS token.
UNK, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML, the chat format of SmolLM2: "<|im_start|>role\ncontent<|im_end|>\n" per message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_vision(directory: Path, seed: int = 0) -> Path:
    """A random 2-layer DINOv2 (width 32, patch 14, native 56 px) plus the preprocessor file the weights
    stage requires (image_mean / image_std)."""
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=VISION_WIDTH, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                          patch_size=14, image_size=VISION_IMAGE_SIZE)
    Dinov2Model(config).save_pretrained(directory)
    preprocessor = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    (Path(directory) / HF_PREPROCESSOR_CONFIG).write_text(json.dumps(preprocessor))
    return Path(directory)


def tiny_bert(directory: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT (width 32, 32 positions) with a word-piece tokenizer, for the Q-Former."""
    write_tiny_bert(directory, with_lm_head=False, seed=seed)
    return Path(directory)


def _llm_corpus() -> list[str]:
    """Every text the LLM sees in tests: synthetic captions, questions and answers, the prompts, chat roles."""
    texts = ["system user assistant"]
    for index in range(200):  # enough scenes to hit every colour, shape, relation and count
        rng = image_rng(0, index)
        scene = sample_scene(rng)
        texts += write_captions(scene, rng)
        texts += [f"{qa.question} {qa.answer}" for qa in ask_questions(scene, rng)]
    for llm in (LLMConfig(), load_params(REPO_ROOT / "params.yaml").llm):
        texts += [llm.system_prompt, llm.caption_prompt, llm.question_suffix]
    texts += cell_names(3) + [SPARE_LABEL]  # the words between the visual tokens (vlm/models/cell_labels.py)
    texts.append("Answer with one word.")  # a question suffix some tests set (the default is none)
    return texts


def tiny_llm_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over the test vocabulary, with SmolLM2's special tokens and ChatML."""
    pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs; whitespace (incl. "\n") is dropped
    words = sorted({piece for text in _llm_corpus()
                    for piece, _ in pre_tokenizer.pre_tokenize_str(text.lower())})
    vocab = {token: index for index, token in enumerate([UNK, IM_START, IM_END, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, bos_token=IM_START, eos_token=IM_END,
                                   pad_token=IM_END, chat_template=CHATML_TEMPLATE)


def tiny_llm(directory: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama (width 32, tied embeddings, grouped-query attention like SmolLM2) + tokenizer."""
    tokenizer = tiny_llm_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def tiny_vlm_folders(root: Path, image_width: int = IMAGE_WIDTH, num_queries: int = TINY_VLM_QUERIES
                     ) -> tuple[Path, Path]:
    """(Q-Former folder, LLM folder) for `tiny_vlm`, written under `root`; the Q-Former reads image tokens
    `image_width` wide."""
    qformer = tiny_qformer(root / "bert", num_queries=num_queries, cross_attention_freq=1,
                           image_hidden_size=image_width)
    qformer.save(root / "qformer")
    return root / "qformer", tiny_llm(root / "llm")


def tiny_vlm(folders: tuple[Path, Path], perturb_seed: int | None = None) -> VisionLanguageModel:
    """A fresh VLM in eval mode. With `perturb_seed`, every trainable weight gets noise, as after training
    (a fresh LoRA adapter is an exact no-op, which would hide a missing or mis-loaded adapter)."""
    torch.manual_seed(0)
    model = VisionLanguageModel.create(folders[0], folders[1], projector_hidden=16, lora=TINY_VLM_LORA,
                                       system_prompt=TINY_VLM_SYSTEM_PROMPT)
    if perturb_seed is not None:
        generator = torch.Generator().manual_seed(perturb_seed)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def image_embeds(batch: int, seed: int = 0) -> torch.Tensor:
    """Random cached-embedding stand-ins for `tiny_vlm`: [batch, TINY_VLM_IMAGE_TOKENS, IMAGE_WIDTH]."""
    return torch.randn(batch, TINY_VLM_IMAGE_TOKENS, IMAGE_WIDTH, generator=torch.Generator().manual_seed(seed))


def training_modes(qformer: torch.nn.Module) -> list[bool]:
    """A list that fills with the Q-Former's `training` flag (what turns its dropout on) at each later pass."""
    modes: list[bool] = []
    qformer.layers[0].register_forward_hook(lambda module, args, output: modes.append(module.training))
    return modes


def tiny_export(root: Path, perturb_seed: int = 1) -> Path:
    """A folder written by `vlm export` (what `vlm.load` and `vlm serve --model` read) holding the tiny backbone
    and a perturbed tiny VLM, with the tiny prompts; made under `root`, returned."""
    from vlm.config import BackboneConfig, EvalConfig, Params
    from vlm.export import export
    from vlm.weights.sources import materialise

    params = Params(backbone=BackboneConfig(source="tiny/vision", image_size=VISION_IMAGE_SIZE, layer=-1),
                    llm=LLMConfig(system_prompt=TINY_VLM_SYSTEM_PROMPT, caption_prompt="Describe the image.",
                                  question_suffix=" Answer with one word."),
                    eval=EvalConfig(max_new_tokens=6, max_answer_tokens=3))
    vision = root / "pipeline" / "vision"
    materialise("vision", str(tiny_vision(root / "tiny_vision")), vision)
    tiny_vlm(tiny_vlm_folders(root / "parts", image_width=VISION_WIDTH), perturb_seed).save(root / "pipeline" / "vlm")
    return export(root / "tiny-vlm", params, True, root / "pipeline" / "vlm", vision, None)
