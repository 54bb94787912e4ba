"""BLIP-2 stage-1 losses: hand-computed ITC, safe hard-negative sampling, switches, and a tiny overfit run."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_qformer import IMAGE_WIDTH, random_text, single_torch_thread, tiny_qformer  # noqa: F401 (autouse)

from vlm.losses import itc_loss, itg_loss, itm_loss, positive_pairs, sample_hard_negatives, stage1_losses
from vlm.models.qformer import QFormer, QFormerOutput

HEAD_PARAMETERS = {
    "itc": ["vision_proj.weight", "text_proj.weight", "temp"],
    "itm": ["itm_head.weight"],
    "itg": ["lm_transform.dense.weight", "lm_bias"],
}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bert")


def _batch(num_images: int, captions_per_image: int, seed: int = 0):
    """Random image embeddings and captions; rows with the same image share image id and embeddings."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, 6, IMAGE_WIDTH, generator=generator)
    image_ids = torch.arange(num_images).repeat(captions_per_image)
    ids, mask = random_text(len(image_ids), 8, generator, padded_from=6)
    return images[image_ids], ids, mask, image_ids


def test_positive_pairs_are_the_same_image_or_the_same_caption_text():
    image_ids = torch.tensor([0, 0, 1, 2, 3])
    input_ids = torch.tensor([[101, 5, 6, 102], [101, 7, 102, 0], [101, 8, 9, 102], [101, 8, 9, 102],
                              [101, 8, 102, 0]])  # rows 2 and 3: two images, one caption text; row 4 a prefix of it
    expected = torch.tensor([[1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0],
                             [0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(positive_pairs(image_ids, input_ids), expected)


def test_itc_matches_hand_computation_with_duplicate_captions():
    image_features = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],
                                   [[0.6, 0.8], [0.8, -0.6]],
                                   [[-1.0, 0.0], [0.0, -1.0]],
                                   [[0.0, 1.0], [-0.6, 0.8]]])
    text_features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-0.8, 0.6], [0.0, -1.0]])
    image_ids = torch.tensor([0, 0, 1, 2])  # rows 0 and 1 are two captions of the same image
    input_ids = torch.tensor([[101, 5, 102], [101, 6, 102], [101, 7, 102], [101, 7, 102]])  # rows 2, 3: one text
    temperature = 0.5

    image_list, text_list = image_features.tolist(), text_features.tolist()
    ids, texts = image_ids.tolist(), input_ids.tolist()
    sim = [[max(sum(a * b for a, b in zip(query, text)) for query in image) for text in text_list]
           for image in image_list]
    n = len(ids)

    def direction_loss(score):  # score(row, column): logit of pairing row with column
        total = 0.0
        for row in range(n):
            log_normaliser = math.log(sum(math.exp(score(row, col) / temperature) for col in range(n)))
            positives = [col for col in range(n) if ids[col] == ids[row] or texts[col] == texts[row]]
            total -= sum(score(row, col) / temperature - log_normaliser for col in positives) / len(positives)
        return total / n

    expected = (direction_loss(lambda i, t: sim[i][t]) + direction_loss(lambda t, i: sim[i][t])) / 2
    actual = itc_loss(image_features, text_features, positive_pairs(image_ids, input_ids), torch.tensor(temperature))
    assert actual.item() == pytest.approx(expected, rel=1e-5)
    # Counting the shared text as a negative (image ids alone) gives another loss: the test can tell them apart.
    by_image_only = itc_loss(image_features, text_features, image_ids[:, None] == image_ids[None, :],
                             torch.tensor(temperature))
    assert abs(by_image_only.item() - expected) > 1e-3


def test_hard_negatives_are_never_positives_even_with_duplicates():
    image_ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5])
    input_ids = torch.arange(12)[:, None].repeat(1, 3)
    input_ids[8] = input_ids[5]  # images 2 and 4 have captions with the same text
    is_positive = positive_pairs(image_ids, input_ids)
    assert is_positive[5, 8] and is_positive[8, 5]
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        similarity = torch.randn(12, 12, generator=generator) * 5
        similarity[is_positive] = 1000.0  # positives are the most similar: the sampler must still skip them
        picks, has_negative = sample_hard_negatives(similarity, is_positive, generator)
        assert has_negative.all()
        assert not is_positive[torch.arange(12), picks].any()


def test_hard_negatives_follow_similarity_and_rows_without_negatives_are_flagged():
    image_ids = torch.tensor([0, 0, 1, 2])
    is_positive = image_ids[:, None] == image_ids[None, :]
    similarity = torch.zeros(4, 4)
    favourite = torch.tensor([3, 2, 3, 0])
    similarity[torch.arange(4), favourite] = 30.0
    picks, has_negative = sample_hard_negatives(similarity, is_positive, torch.Generator().manual_seed(1))
    assert torch.equal(picks, favourite)
    assert has_negative.all()

    _, has_negative = sample_hard_negatives(torch.zeros(3, 3), torch.ones(3, 3, dtype=torch.bool))
    assert not has_negative.any()


def test_itm_pairs_are_one_positive_and_two_true_negatives_per_item(bert_dir, monkeypatch):
    """With a head that knows the truth the loss is ~0 only if every label agrees with its pair."""
    qformer = tiny_qformer(bert_dir)
    images, ids, mask, image_ids = _batch(3, 2)  # every image has two captions
    images[:, 0, 0] = image_ids.float()  # tag each row with its image id ...
    ids[:, 1] = 100 + image_ids  # ... and each caption too (ids only reach the spy below, never the model)
    seen_pairs = []

    def spy_forward(image_embeds, input_ids, attention_mask, mode, image_mask=None):
        pair = torch.stack([image_embeds[:, 0, 0].long(), input_ids[:, 1] - 100], dim=1)
        seen_pairs.append(pair)
        return QFormerOutput(query_hidden=pair[:, None].float(), text_hidden=pair[:, None].float())

    def oracle_logits(query_hidden):
        match = (query_hidden[:, 0, 0] == query_hidden[:, 0, 1]).float() * 2 - 1
        return torch.stack([-20 * match, 20 * match], dim=1)

    monkeypatch.setattr(qformer, "forward", spy_forward)
    monkeypatch.setattr(qformer, "itm_logits", oracle_logits)
    similarity = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    loss = itm_loss(qformer, images, None, ids, mask, similarity, positive_pairs(image_ids, ids),
                    torch.Generator().manual_seed(1))
    pairs = seen_pairs[0]
    assert len(pairs) == 3 * 6
    assert (pairs[:, 0] == pairs[:, 1]).sum() == 6, "exactly one positive pair per item"
    assert loss.item() < 1e-6


def test_itg_predicts_each_next_real_token_after_the_dec_token(bert_dir):
    qformer = tiny_qformer(bert_dir)
    with torch.no_grad():  # [DEC] starts as a copy of [CLS]; make it differ so that using it is observable
        qformer.word_embeddings.weight[qformer.config.dec_token_id] += torch.randn(qformer.config.hidden_size)
    images, ids, mask, _ = _batch(2, 1)  # positions 6 and 7 are padding
    decoder_ids = ids.clone()
    decoder_ids[:, 0] = qformer.config.dec_token_id
    with torch.no_grad():
        logits = qformer.lm_logits(qformer(images, decoder_ids, mask, mode="itg").text_hidden)
        log_probs = logits.log_softmax(dim=-1)
        targets = [(row, position) for row in range(2) for position in range(1, 8) if mask[row, position]]
        expected = -sum(log_probs[row, position - 1, ids[row, position]] for row, position in targets) / len(targets)
        actual = itg_loss(qformer, images, None, ids, mask)
        garbage_padding = ids.masked_fill(mask == 0, 7)
        assert itg_loss(qformer, images, None, garbage_padding, mask).item() == pytest.approx(actual.item())
    assert actual.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("switched_off", ["itc", "itm", "itg"])
def test_a_zero_weight_removes_the_loss_and_its_gradient(bert_dir, switched_off):
    qformer = tiny_qformer(bert_dir)
    images, ids, mask, image_ids = _batch(3, 2)
    weights = {name: 0.0 if name == switched_off else 1.0 for name in HEAD_PARAMETERS}
    losses = stage1_losses(qformer, images, ids, mask, image_ids, weights, torch.Generator().manual_seed(0))
    losses["loss"].backward()

    assert switched_off not in losses
    parameters = dict(qformer.named_parameters())
    for name, head in HEAD_PARAMETERS.items():
        for parameter_name in head:
            gradient = parameters[parameter_name].grad
            if name == switched_off:
                assert gradient is None, f"{parameter_name} got a gradient although {name} is off"
            else:
                assert gradient is not None and gradient.abs().sum() > 0, f"{parameter_name} got no gradient"
    active = [name for name in HEAD_PARAMETERS if name != switched_off]
    assert losses["loss"].item() == pytest.approx(sum(losses[name].item() for name in active), rel=1e-5)


def test_gather_fn_feeds_itc(bert_dir):
    """Duplicating every feature (as if a second rank held a copy) adds exactly log(2) to ITC."""
    qformer = tiny_qformer(bert_dir)
    images, ids, mask, image_ids = _batch(3, 2)
    single = stage1_losses(qformer, images, ids, mask, image_ids, {"itc": 1.0})
    doubled = stage1_losses(qformer, images, ids, mask, image_ids, {"itc": 1.0},
                            gather_fn=lambda tensor: torch.cat([tensor, tensor]))
    assert doubled["itc"].item() == pytest.approx(single["itc"].item() + math.log(2), rel=1e-5)


def test_itm_survives_a_batch_without_negatives(bert_dir):
    qformer = tiny_qformer(bert_dir)
    images, ids, mask, _ = _batch(1, 4)
    losses = stage1_losses(qformer, images, ids, mask, torch.zeros(4, dtype=torch.long), {"itm": 1.0})
    assert torch.isfinite(losses["itm"])


def test_bad_weights_are_rejected(bert_dir):
    qformer = tiny_qformer(bert_dir)
    images, ids, mask, image_ids = _batch(2, 1)
    with pytest.raises(ValueError, match="unknown loss weights"):
        stage1_losses(qformer, images, ids, mask, image_ids, {"itc": 1.0, "contrastive": 1.0})
    with pytest.raises(ValueError, match="every loss weight is 0"):
        stage1_losses(qformer, images, ids, mask, image_ids, {"itc": 0.0})


def test_tiny_model_overfits_a_tiny_batch(bert_dir):
    """8 images x 2 captions, 100 joint steps: every loss must fall below half its start.

    ITM is the slow one: at random init it sits on a plateau (predicting the 1/3 prior) until attention learns to
    relate queries and text, and the ITC gradient delays that further. Width 64, lr 3e-3 and gradient clipping get
    it off the plateau within 100 steps (checked for seeds 0-6). ITC cannot go below ln 2 here: with two captions
    per image its soft targets have that entropy.
    """
    torch.manual_seed(0)
    qformer: QFormer = tiny_qformer(bert_dir, hidden_size=64).train()
    images, ids, mask, image_ids = _batch(8, 2, seed=3)
    optimizer = torch.optim.Adam(qformer.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    history = []
    for _ in range(100):
        losses = stage1_losses(qformer, images, ids, mask, image_ids, {"itc": 1.0, "itm": 1.0, "itg": 1.0},
                               generator)
        optimizer.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(qformer.parameters(), 1.0)
        optimizer.step()
        history.append({name: losses[name].item() for name in HEAD_PARAMETERS})
    for name in HEAD_PARAMETERS:
        start = history[0][name]
        end = sum(step[name] for step in history[-5:]) / 5
        assert end < 0.5 * start, f"{name} fell only from {start:.3f} to {end:.3f}"
