"""The Q-Former: BERT weight mapping, attention masks (who may see what), persistence."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_qformer import (  # noqa: F401 (single_torch_thread is an autouse fixture)
    IMAGE_WIDTH,
    SPECIAL_TOKENS,
    random_text,
    single_torch_thread,
    tiny_qformer,
    write_tiny_bert,
)

from vlm.models.qformer import (
    DEC_TOKEN,
    QFormer,
    QFormerConfig,
    bidirectional_mask,
    multimodal_causal_mask,
    unimodal_mask,
)

NUM_QUERIES = 4


@pytest.fixture(scope="module")
def qformer(tmp_path_factory) -> QFormer:
    return tiny_qformer(tmp_path_factory.mktemp("bert"), num_queries=NUM_QUERIES, cross_attention_freq=2)


def _from_bert(bert_dir) -> QFormer:
    return QFormer.from_bert(bert_dir, num_queries=3, cross_attention_freq=1, image_hidden_size=IMAGE_WIDTH,
                             max_text_len=16).eval()


def _clearly_differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """More than float noise: a constant shift before a LayerNorm, for instance, changes outputs only ~1e-7."""
    return (a - b).abs().max().item() > 1e-3


def _images(batch: int = 2, tokens: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, tokens, IMAGE_WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("legacy_names", [False, True])
def test_text_path_equals_bert(tmp_path, legacy_names):
    bert = write_tiny_bert(tmp_path)
    if legacy_names:  # original bert-base checkpoints: "bert." prefix and LayerNorm gamma/beta
        path = str(tmp_path / "model.safetensors")
        legacy = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
        renamed = {}
        for key, value in load_file(path).items():
            for modern, old_name in legacy.items():
                key = key.replace(modern, old_name)
            renamed["bert." + key] = value
        save_file(renamed, path)
    qformer = _from_bert(tmp_path)
    ids, mask = random_text(3, 9, torch.Generator().manual_seed(1), padded_from=6)
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = qformer.encode_text(ids, mask)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_lm_head_and_prefixed_keys_load_from_pretraining_checkpoint(tmp_path):
    bert = write_tiny_bert(tmp_path, with_lm_head=True)
    qformer = _from_bert(tmp_path)
    vocab = bert.config.vocab_size
    ids, mask = random_text(2, 7, torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask).logits
        actual = qformer.lm_logits(qformer.encode_text(ids, mask))
    torch.testing.assert_close(actual[..., :vocab], expected, atol=1e-4, rtol=1e-4)


def test_new_parameters_are_exactly_those_bert_does_not_initialise(tmp_path):
    write_tiny_bert(tmp_path)
    torch.manual_seed(0)
    first = _from_bert(tmp_path)
    torch.manual_seed(1)
    second = dict(_from_bert(tmp_path).named_parameters())
    new = {id(p) for p in first.new_parameters()}
    for name, parameter in first.named_parameters():
        from_seed = not torch.equal(parameter, second[name])  # random init differs between seeds; copies do not
        if from_seed:
            assert id(parameter) in new, f"{name} is freshly initialised but not among the new parameters"
        elif id(parameter) in new:
            assert parameter.dim() < 2, f"{name} is copied from BERT but counted as new"
    assert any(".cross_attention." in name for name, p in first.named_parameters() if id(p) in new)


def test_dec_token_is_added_as_a_copy_of_cls(qformer):
    tokenizer = qformer.tokenizer
    dec = qformer.config.dec_token_id
    assert tokenizer.convert_tokens_to_ids(DEC_TOKEN) == dec
    assert tokenizer.bos_token_id == dec
    assert dec not in {tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    assert qformer.word_embeddings.num_embeddings == dec + 1 == qformer.config.vocab_size
    cls_row = qformer.word_embeddings.weight[tokenizer.cls_token_id]
    torch.testing.assert_close(qformer.word_embeddings.weight[dec], cls_row)


def test_new_parts_and_query_ffn_initialisation(qformer):
    has_cross = [layer.cross_attention is not None for layer in qformer.layers]
    assert has_cross == [i % 2 == 0 for i in range(len(qformer.layers))]
    for layer in qformer.layers:
        for (name, query_param), text_param in zip(layer.query_ffn.named_parameters(), layer.text_ffn.parameters()):
            torch.testing.assert_close(query_param, text_param, msg=f"query_ffn.{name} is not a copy")
            assert query_param.data_ptr() != text_param.data_ptr(), "query FFN must be separate, not shared"
    assert 0.01 < qformer.query_tokens.std().item() < 0.04
    assert qformer.temp.item() == pytest.approx(0.07)


def test_queries_use_their_own_feed_forward_and_text_the_bert_one(tmp_path):
    qformer = tiny_qformer(tmp_path)
    images = _images()
    ids, mask = random_text(2, 6)
    with torch.no_grad():
        before = qformer(images, ids, mask, mode="itc")
        for layer in qformer.layers:
            layer.text_ffn.dense_out.bias.add_(torch.randn(qformer.config.hidden_size))
        text_changed = qformer(images, ids, mask, mode="itc")
        for layer in qformer.layers:
            layer.query_ffn.dense_out.bias.add_(torch.randn(qformer.config.hidden_size))
        both_changed = qformer(images, ids, mask, mode="itc")
    torch.testing.assert_close(text_changed.query_hidden, before.query_hidden)
    assert _clearly_differs(text_changed.text_hidden, before.text_hidden)
    torch.testing.assert_close(both_changed.text_hidden, text_changed.text_hidden)
    assert _clearly_differs(both_changed.query_hidden, text_changed.query_hidden)


def test_without_separate_query_ffn_queries_share_the_bert_feed_forward(tmp_path):
    write_tiny_bert(tmp_path)
    qformer = QFormer.from_bert(tmp_path, num_queries=3, cross_attention_freq=1, image_hidden_size=IMAGE_WIDTH,
                                separate_query_ffn=False, max_text_len=16).eval()
    assert all(layer.query_ffn is None for layer in qformer.layers)
    images = _images()
    with torch.no_grad():
        before = qformer.encode_image(images)
        qformer.layers[-1].text_ffn.dense_out.bias.add_(torch.randn(qformer.config.hidden_size))
        assert _clearly_differs(qformer.encode_image(images), before)


def test_missing_bert_weights_are_listed(tmp_path):
    write_tiny_bert(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["encoder.layer.1.output.dense.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="encoder.layer.1.output.dense.weight"):
        _from_bert(tmp_path)


def test_masks_have_the_documented_structure():
    text_mask = torch.tensor([[1, 1, 1, 0]])  # Q = 2 queries, 3 real tokens, 1 pad
    q, t = slice(0, 2), slice(2, 6)
    uni, bi, causal = (make(2, text_mask)[0] for make in (unimodal_mask, bidirectional_mask, multimodal_causal_mask))
    assert uni[q, q].all() and not uni[q, t].any() and not uni[t, q].any()
    assert bi[:, :5].all() and not bi[:, 5].any()  # everyone sees every real position, nobody sees the pad
    assert causal[:, q].all() and not causal[q, t].any()
    assert torch.equal(causal[2:5, 2:5], torch.ones(3, 3, dtype=torch.bool).tril())
    assert not causal[:, 5].any()


def test_itc_query_outputs_ignore_the_text_and_text_ignores_the_image(qformer):
    images, other_images = _images(seed=0), _images(seed=1)
    ids, mask = random_text(2, 8, torch.Generator().manual_seed(3))
    other_ids, other_mask = random_text(2, 6, torch.Generator().manual_seed(4), padded_from=4)
    with torch.no_grad():
        base = qformer(images, ids, mask, mode="itc")
        new_text = qformer(images, other_ids, other_mask, mode="itc")
        new_image = qformer(other_images, ids, mask, mode="itc")
        torch.testing.assert_close(base.query_hidden, qformer.encode_image(images))
        torch.testing.assert_close(base.text_hidden, qformer.encode_text(ids, mask))
    torch.testing.assert_close(new_text.query_hidden, base.query_hidden)
    torch.testing.assert_close(new_image.text_hidden, base.text_hidden)
    assert _clearly_differs(new_image.query_hidden, base.query_hidden), "queries must see the image"


def test_itm_lets_queries_and_text_see_each_other(qformer):
    images = _images()
    ids, mask = random_text(2, 8, torch.Generator().manual_seed(5))
    changed = ids.clone()
    changed[:, 3] = changed[:, 3] % 40 + 6
    with torch.no_grad():
        base = qformer(images, ids, mask, mode="itm")
        new_text = qformer(images, changed, mask, mode="itm")
        new_image = qformer(_images(seed=7), ids, mask, mode="itm")
    assert _clearly_differs(new_text.query_hidden, base.query_hidden)
    assert _clearly_differs(new_image.text_hidden, base.text_hidden)


def test_itg_is_causal_over_text_and_queries_never_see_text(qformer):
    images = _images()
    ids, mask = random_text(2, 8, torch.Generator().manual_seed(6))
    changed = ids.clone()
    changed[:, 5] = changed[:, 5] % 40 + 6  # a different word at position 5
    with torch.no_grad():
        base = qformer(images, ids, mask, mode="itg")
        new_text = qformer(images, changed, mask, mode="itg")
        new_image = qformer(_images(seed=8), ids, mask, mode="itg")
    torch.testing.assert_close(new_text.text_hidden[:, :5], base.text_hidden[:, :5])
    assert _clearly_differs(new_text.text_hidden[:, 5:], base.text_hidden[:, 5:])
    torch.testing.assert_close(new_text.query_hidden, base.query_hidden)
    assert _clearly_differs(new_image.text_hidden[:, 0], base.text_hidden[:, 0]), "text must see the queries"


def test_padded_image_tokens_are_ignored(qformer):
    images = _images(tokens=5)
    image_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    garbage = images.clone()
    garbage[image_mask == 0] = 100.0
    with torch.no_grad():
        torch.testing.assert_close(qformer.encode_image(garbage, image_mask), qformer.encode_image(images, image_mask))


def test_bad_inputs_raise_clear_errors(qformer):
    ids, mask = random_text(2, 4)
    with pytest.raises(ValueError, match="image_hidden_size"):
        qformer.encode_image(torch.zeros(2, 3, IMAGE_WIDTH + 1))
    with pytest.raises(ValueError, match="mode"):
        qformer(_images(), ids, mask, mode="captioning")
    with pytest.raises(ValueError, match="unknown keys"):
        QFormerConfig.from_dict({**qformer.config.to_dict(), "hidden": 3})


def test_save_load_round_trip_and_overwrite(qformer, tmp_path):
    out_dir = tmp_path / "qformer"
    qformer.save(out_dir)
    with torch.no_grad():
        noise = torch.randn_like(qformer.query_tokens)
        qformer.query_tokens.add_(noise)  # the second save must replace the first one
        qformer.save(out_dir)
        loaded = QFormer.load(out_dir).eval()
        images = _images()
        ids, mask = random_text(2, 6)
        torch.testing.assert_close(loaded(images, ids, mask, "itm"), qformer(images, ids, mask, "itm"))
        qformer.query_tokens.sub_(noise)
    assert loaded.config == qformer.config
    assert loaded.tokenizer.convert_tokens_to_ids(DEC_TOKEN) == qformer.config.dec_token_id
    assert sorted(path.name for path in tmp_path.iterdir()) == ["qformer"], "no temporary folders left behind"
