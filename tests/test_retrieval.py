"""Retrieval metrics: known answers from an oracle Q-Former, and batching invariance with a real tiny one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_qformer import (  # noqa: F401 (single_torch_thread is an autouse fixture)
    IMAGE_WIDTH,
    SPECIAL_TOKENS,
    single_torch_thread,
    tiny_qformer,
    write_tiny_bert,
)

from vlm.eval.retrieval import rerank_score, retrieval_metrics
from vlm.models.qformer import QFormer, QFormerOutput

NUM_IMAGES = 6
FIRST_WORD_ID = len(SPECIAL_TOKENS)  # "w0" has this token id


class OracleQFormer(QFormer):
    """Scores are set by hand: image i is the tensor filled with i, a caption's first word w{i} names its image.

    ITC puts weight 0.6 on the true image and 0.8 on image (i + itc_shift) % N, so with itc_shift=1 the ITC top-1
    is always wrong and the truth is second; ITM knows the truth.
    """

    itc_shift = 0

    def encode_image(self, image_embeds, image_mask=None):
        return image_embeds[:, :1, :1]  # [B, 1, 1]: the image index

    def image_features(self, query_hidden):
        index = query_hidden[:, 0, 0].round().long()
        if self.itc_shift == 0:
            return F.one_hot(index, NUM_IMAGES).float()[:, None]
        decoy = F.one_hot((index + self.itc_shift) % NUM_IMAGES, NUM_IMAGES)
        return (0.6 * F.one_hot(index, NUM_IMAGES) + 0.8 * decoy).float()[:, None]

    def encode_text(self, input_ids, attention_mask):
        return (input_ids[:, 1:2] - FIRST_WORD_ID)[..., None].float()  # [B, 1, 1]: the named image

    def text_features(self, text_hidden):
        return F.one_hot(text_hidden[:, 0, 0].long(), NUM_IMAGES).float()

    def forward(self, image_embeds, input_ids, attention_mask, mode, image_mask=None):
        pair = torch.cat([self.encode_image(image_embeds), self.encode_text(input_ids, attention_mask)], dim=-1)
        return QFormerOutput(query_hidden=pair, text_hidden=pair)

    def itm_logits(self, query_hidden):
        match = (query_hidden[:, 0, 0] == query_hidden[:, 0, 1]).float() * 2 - 1
        return torch.stack([-5 * match, 5 * match], dim=1)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert")
    write_tiny_bert(directory)
    return directory


@pytest.fixture(scope="module")
def oracle(bert_dir) -> OracleQFormer:
    return OracleQFormer.from_bert(bert_dir, num_queries=1, cross_attention_freq=1, image_hidden_size=IMAGE_WIDTH,
                                   max_text_len=16)


def _oracle_data():
    images = torch.arange(NUM_IMAGES, dtype=torch.float)[:, None, None].expand(-1, 3, IMAGE_WIDTH).contiguous()
    image_of_text = [image for image in range(NUM_IMAGES) for _ in range(2)][::-1]  # order must not matter
    texts = [f"w{image} w{20 + n % 2}" for n, image in enumerate(image_of_text)]
    return images, texts, image_of_text


def test_perfect_features_give_perfect_recall(oracle):
    oracle.itc_shift = 0
    images, texts, image_of_text = _oracle_data()
    metrics = retrieval_metrics(oracle, images, texts, image_of_text, k_rerank=3, batch_size=4)
    assert metrics == {key: 1.0 for key in metrics}
    assert set(metrics) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1_itm",
                            "t2i_r1_itm"}


@pytest.mark.parametrize(("k_rerank", "i2t_itm", "t2i_itm"), [(1, 0.0, 0.0), (2, 0.0, 1.0), (4, 1.0, 1.0)])
def test_itm_reranking_repairs_itc_only_within_the_top_k(oracle, k_rerank, i2t_itm, t2i_itm):
    """ITC ranks the truth 3rd-4th for images (two decoy captions first) and 2nd for texts."""
    oracle.itc_shift = 1
    images, texts, image_of_text = _oracle_data()
    metrics = retrieval_metrics(oracle, list(images.split(4)), texts, image_of_text, k_rerank=k_rerank,
                                batch_size=3)
    assert (metrics["i2t_r1"], metrics["i2t_r5"], metrics["t2i_r1"], metrics["t2i_r5"]) == (0.0, 1.0, 0.0, 1.0)
    assert (metrics["i2t_r1_itm"], metrics["t2i_r1_itm"]) == (i2t_itm, t2i_itm)


class HesitantITMOracle(OracleQFormer):
    """ITC right by a small margin: image i's feature is 0.8 on its own texts and 0.6 on image i + 1's. ITM mildly
    wrong: it prefers each image's decoy (log-odds +0.5 for image i with image i + 1's texts, -0.5 for the truth,
    match probabilities 0.62 against 0.38)."""

    def image_features(self, query_hidden):
        index = query_hidden[:, 0, 0].round().long()
        decoy = F.one_hot((index + 1) % NUM_IMAGES, NUM_IMAGES)
        return (0.8 * F.one_hot(index, NUM_IMAGES) + 0.6 * decoy).float()[:, None]

    def itm_logits(self, query_hidden):
        image, named = query_hidden[:, 0, 0], query_hidden[:, 0, 1]
        log_odds = torch.where(named == image, -0.5, torch.where(named == (image + 1) % NUM_IMAGES, 0.5, -5.0))
        return torch.stack([torch.zeros_like(log_odds), log_odds], dim=1)


def test_a_hesitant_itm_head_does_not_overrule_a_confident_itc(bert_dir):
    """ITC's margin, 0.2 in cosine, is 2.9 logits at temperature 0.07; ITM's is 1.0 logit the other way. On one scale
    ITC wins and the re-ranking keeps every right answer; adding ITM's probability (0.24 apart) to the cosine, as
    this code once did, flipped them all."""
    oracle = HesitantITMOracle.from_bert(bert_dir, num_queries=1, cross_attention_freq=1,
                                         image_hidden_size=IMAGE_WIDTH, max_text_len=16)
    assert oracle.temperature().item() == pytest.approx(0.07)
    images, texts, image_of_text = _oracle_data()
    metrics = retrieval_metrics(oracle, images, texts, image_of_text, k_rerank=4, batch_size=4)
    assert (metrics["i2t_r1"], metrics["t2i_r1"]) == (1.0, 1.0)
    assert (metrics["i2t_r1_itm"], metrics["t2i_r1_itm"]) == (1.0, 1.0)


def test_rerank_score_adds_itc_logit_and_itm_log_odds():
    similarity, log_odds = torch.tensor([0.9, 0.8]), torch.tensor([-0.5, 0.5])
    assert rerank_score(similarity, log_odds, temperature=0.07).argmax() == 0  # 12.36 against 11.93
    assert rerank_score(similarity, 3 * log_odds, temperature=0.07).argmax() == 1  # a confident ITM wins
    assert torch.allclose(rerank_score(similarity, log_odds, 0.1), torch.tensor([8.5, 8.5]))


def test_a_text_shared_by_two_images_matches_both(oracle):
    """Image 5 also has image 0's caption "w0 w20". ITC ranks image 5 first for every text that names image 0
    (itc_shift=1), so for the two copies of that caption, and for no other text, the first image is a right one."""
    oracle.itc_shift = 1
    images, texts, image_of_text = _oracle_data()
    assert "w0 w20" in texts
    texts, image_of_text = texts + ["w0 w20"], image_of_text + [5]
    metrics = retrieval_metrics(oracle, images, texts, image_of_text, k_rerank=0, batch_size=4)
    assert metrics["t2i_r1"] == pytest.approx(2 / len(texts))  # counting by owner alone: 1 / len(texts)


def test_k_rerank_zero_skips_the_itm_head_entirely(oracle, monkeypatch):
    oracle.itc_shift = 1
    images, texts, image_of_text = _oracle_data()
    monkeypatch.setattr(oracle, "itm_logits", lambda *_: pytest.fail("ITM ran with k_rerank=0"))
    metrics = retrieval_metrics(oracle, images, texts, image_of_text, k_rerank=0, batch_size=4)
    assert set(metrics) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}


def test_real_model_metrics_do_not_depend_on_batching(tmp_path):
    qformer = tiny_qformer(tmp_path).train()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(7, 5, IMAGE_WIDTH, generator=generator)
    image_of_text = [n // 2 for n in range(14)]
    texts = [" ".join(f"w{word}" for word in torch.randint(0, 40, (4,), generator=generator).tolist())
             for _ in image_of_text]
    whole = retrieval_metrics(qformer, images, texts, image_of_text, k_rerank=3, batch_size=64)
    batched = retrieval_metrics(qformer, [images[:3], images[3:6], images[6:]], texts, image_of_text,
                                k_rerank=3, batch_size=2)
    assert whole == batched
    assert all(0.0 <= value <= 1.0 for value in whole.values())
    assert whole["i2t_r1"] <= whole["i2t_r5"] <= whole["i2t_r10"] == 1.0  # 10 >= the 7 candidate texts per image
    assert qformer.training, "the caller's train/eval mode must be restored"


def test_bad_inputs_raise_clear_errors(oracle):
    images, texts, image_of_text = _oracle_data()
    with pytest.raises(TypeError, match="one-shot iterator"):
        retrieval_metrics(oracle, (batch for batch in images.split(2)), texts, image_of_text)
    with pytest.raises(ValueError, match="one image index per text"):
        retrieval_metrics(oracle, images, texts, image_of_text[:-1])
    with pytest.raises(ValueError, match=r"must lie in \[0, 6\)"):
        retrieval_metrics(oracle, images, texts, [9] * len(texts))
