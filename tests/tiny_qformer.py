"""Shared builders for the Q-Former tests: a tiny random BERT folder and a Q-Former loaded from it.

Nothing is downloaded: the BERT is a random transformers model with a 48-word vocabulary written to a tmp dir.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer

from vlm.models.qformer import QFormer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(43)]
IMAGE_WIDTH = 12


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Import into a test module to run it on one thread: these tensors are tiny, and on a busy 2-core machine
    a second thread mostly spins and waits (measured: ~25x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_tiny_bert(directory: Path, with_lm_head: bool = False, seed: int = 0,
                    hidden_size: int = 32) -> BertModel | BertForMaskedLM:
    """Save a tiny random BERT (+ tokenizer) to directory and return the model in eval mode.

    with_lm_head=True saves a BertForMaskedLM, whose keys carry the "bert." prefix and a cls.predictions head.
    Every weight is perturbed away from its default init (e.g. LayerNorm = 1/0) so a wrong mapping shows up.
    """
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(SPECIAL_TOKENS) + len(WORDS), hidden_size=hidden_size, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=2 * hidden_size, max_position_embeddings=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(config) if with_lm_head else BertModel(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(directory)
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
    BertTokenizer(vocab=vocab).save_pretrained(directory)
    return model.eval()


def tiny_qformer(directory: Path, num_queries: int = 4, cross_attention_freq: int = 1,
                 with_lm_head: bool = False, seed: int = 0, hidden_size: int = 32,
                 image_hidden_size: int = IMAGE_WIDTH, spatial_grid: int = 0) -> QFormer:
    write_tiny_bert(directory, with_lm_head=with_lm_head, seed=seed, hidden_size=hidden_size)
    qformer = QFormer.from_bert(directory, num_queries=num_queries, cross_attention_freq=cross_attention_freq,
                                image_hidden_size=image_hidden_size, embed_dim=16, max_text_len=16)
    qformer.use_spatial_grid(spatial_grid)
    return qformer.eval()


def random_text(batch: int, length: int, generator: torch.Generator | None = None,
                padded_from: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] w.. w.. [SEP] ids and attention mask; positions >= padded_from are [PAD] with mask 0."""
    first_word = len(SPECIAL_TOKENS)
    ids = torch.randint(first_word, first_word + len(WORDS), (batch, length), generator=generator)
    ids[:, 0] = SPECIAL_TOKENS.index("[CLS]")
    ids[:, -1] = SPECIAL_TOKENS.index("[SEP]")
    mask = torch.ones_like(ids)
    if padded_from is not None:
        ids[:, padded_from:] = SPECIAL_TOKENS.index("[PAD]")
        mask[:, padded_from:] = 0
    return ids, mask
