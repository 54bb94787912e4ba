"""Image-text retrieval with the stage-1 Q-Former, evaluated the BLIP-2 way.

1. Rank every text for every image (and vice versa) by ITC similarity: recall@1/5/10.
2. Re-rank each query's ITC top-k candidates with the ITM head: recall@1 after re-ranking. ITM is far more
   expensive (one joint pass per pair), hence the top-k. The score adds the two heads' evidence on one scale,
   logits: ITC's cosine / temperature (the logit its softmax was trained on) + ITM's log-odds of "match"
   (`rerank_score`). BLIP-2's code adds the raw match logit to the raw cosine, and we first added the match
   probability to the cosine: either way the cosine's spread over the top-k (~0.01) is too small to count, so a
   half-trained ITM head alone decides, and re-ranking then falls below ITC alone; on one scale it does not
   (docs/experiments/stage1-losses.md).

Recalls are fractions in [0, 1]. Image-to-text counts a hit when ANY caption of the image is within the top K.
A text matches every image that has it as a caption: the synthetic scenes repeat short captions ("a small red star
in the bottom left of the image."), and ranking the other image with that caption first is no error.
Image embeddings are read twice (ITC, then the ITM pairs), so they must come as a tensor or a re-iterable of
batches (e.g. a list or a DataLoader); the similarity matrix [N images, M texts] is kept in memory as float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from vlm.config import RECALL_KS
from vlm.losses import itc_similarity
from vlm.models.qformer import QFormer


def _image_batches(image_embeds: torch.Tensor | Iterable[torch.Tensor], batch_size: int,
                   device: torch.device) -> Iterator[torch.Tensor]:
    batches = image_embeds.split(batch_size) if isinstance(image_embeds, torch.Tensor) else image_embeds
    for batch in batches:
        yield batch.to(device)


def recall_at_k(is_hit: torch.Tensor, k: int) -> float:
    """Fraction of rows with a hit among their first k candidates; is_hit [R, C] follows the ranking, best first."""
    return is_hit[:, :k].any(dim=1).float().mean().item()


def rerank_score(similarity: torch.Tensor, itm_log_odds: torch.Tensor, temperature: float) -> torch.Tensor:
    """The re-ranking score of candidate pairs: ITC's logit (cosine / temperature) + ITM's log-odds of "match".

    Both are log-scale evidence, so neither swamps the other by its units: a confident ITC (cosines 0.9 against
    0.8 at temperature 0.07 are 1.4 logits apart) outweighs a hesitant ITM (match probabilities 0.38 against 0.62,
    1.0 apart), and a confident ITM outweighs a hesitant ITC."""
    return similarity / temperature + itm_log_odds


def _itm_scores(qformer: QFormer, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                batch_size: int) -> torch.Tensor:
    """Log-odds of "match" for each (images[p], input_ids[p]) pair, in chunks of batch_size pairs."""
    scores = []
    for start in range(0, len(images), batch_size):
        chunk = slice(start, start + batch_size)
        output = qformer(images[chunk], input_ids[chunk], attention_mask[chunk], mode="itm")
        logits = qformer.itm_logits(output.query_hidden).float()
        scores.append(logits[:, 1] - logits[:, 0])
    return torch.cat(scores) if scores else torch.zeros(0, device=images.device)


@torch.inference_mode()
def retrieval_metrics(qformer: QFormer, image_embeds: torch.Tensor | Iterable[torch.Tensor], texts: list[str],
                      text_image_index: list[int], k_rerank: int = 16, batch_size: int = 64) -> dict[str, float]:
    """Recall metrics for N images and M texts; text j describes image text_image_index[j].

    image_embeds: [N, T, Di] tensor, or a re-iterable of [b, T, Di] batches in image order.
    Returns i2t_r1/r5/r10, t2i_r1/r5/r10 (ITC) and, unless k_rerank is 0, i2t_r1_itm, t2i_r1_itm (ITM
    re-ranking of the ITC top-k). Use k_rerank=0 for a Q-Former trained without ITM: its ITM head is untrained.
    """
    if len(texts) != len(text_image_index):
        raise ValueError(f"retrieval_metrics: {len(texts)} texts but {len(text_image_index)} entries in "
                         "text_image_index; give one image index per text.")
    if not texts:
        raise ValueError("retrieval_metrics: texts is empty; nothing to retrieve.")
    if not isinstance(image_embeds, torch.Tensor) and iter(image_embeds) is image_embeds:
        raise TypeError("retrieval_metrics: image_embeds is a one-shot iterator (e.g. a generator) but it is read "
                        "twice; pass a tensor, a list of batches or a re-iterable such as a DataLoader.")
    if qformer.tokenizer is None:
        raise ValueError("retrieval_metrics: the Q-Former has no tokenizer; build it with QFormer.from_bert or "
                         "QFormer.load from a folder that contains tokenizer files.")
    if k_rerank < 0 or batch_size < 1:
        raise ValueError(f"retrieval_metrics: k_rerank must be >= 0 and batch_size >= 1, got {k_rerank}, "
                         f"{batch_size}.")

    was_training = qformer.training
    qformer.eval()  # no dropout while scoring
    try:
        return _compute_metrics(qformer, image_embeds, texts, text_image_index, k_rerank, batch_size)
    finally:
        qformer.train(was_training)


def _compute_metrics(qformer: QFormer, image_embeds: torch.Tensor | Iterable[torch.Tensor], texts: list[str],
                     text_image_index: list[int], k_rerank: int, batch_size: int) -> dict[str, float]:
    device = next(qformer.parameters()).device
    tokens = qformer.tokenizer(texts, padding="longest", truncation=True, max_length=qformer.config.max_text_len,
                               return_tensors="pt")
    input_ids, attention_mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)

    similarity = _itc_similarity_matrix(qformer, image_embeds, input_ids, attention_mask, batch_size, device)
    num_images, num_texts = similarity.shape
    image_of_text = torch.tensor(text_image_index, device=device)
    if image_of_text.min() < 0 or image_of_text.max() >= num_images:
        raise ValueError(f"retrieval_metrics: text_image_index must lie in [0, {num_images}) for the {num_images} "
                         f"images given, got values in [{image_of_text.min().item()}, {image_of_text.max().item()}].")

    matches = _text_matches_image(texts, text_image_index, num_images).to(device)  # [N, M]

    max_k = max(RECALL_KS + (k_rerank,))
    text_ranking = similarity.topk(min(max_k, num_texts), dim=1).indices  # [N, k] texts per image, best first
    image_ranking = similarity.t().topk(min(max_k, num_images), dim=1).indices  # [M, k] images per text
    metrics = {}
    for k in RECALL_KS:
        metrics[f"i2t_r{k}"] = recall_at_k(matches.gather(1, text_ranking), k)
        metrics[f"t2i_r{k}"] = recall_at_k(matches.t().gather(1, image_ranking), k)
    if k_rerank == 0:
        return metrics

    text_candidates, image_candidates = text_ranking[:, :k_rerank], image_ranking[:, :k_rerank]
    text_scores, image_scores = _itm_rerank_scores(qformer, image_embeds, input_ids, attention_mask, similarity,
                                                   text_candidates, image_candidates, batch_size, device)
    best_text = text_candidates.gather(1, text_scores.argmax(dim=1, keepdim=True))
    best_image = image_candidates.gather(1, image_scores.argmax(dim=1, keepdim=True))
    metrics["i2t_r1_itm"] = recall_at_k(matches.gather(1, best_text), 1)
    metrics["t2i_r1_itm"] = recall_at_k(matches.t().gather(1, best_image), 1)
    return metrics


def _text_matches_image(texts: list[str], text_image_index: list[int], num_images: int) -> torch.Tensor:
    """Bool [N images, M texts]: text j is a caption of image i, or the same string as one of its captions."""
    owners: dict[str, list[int]] = {}
    for text, image in zip(texts, text_image_index):
        owners.setdefault(text, []).append(image)
    matches = torch.zeros(num_images, len(texts), dtype=torch.bool)
    for column, text in enumerate(texts):
        matches[owners[text], column] = True
    return matches


def _itc_similarity_matrix(qformer: QFormer, image_embeds: torch.Tensor | Iterable[torch.Tensor],
                           input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int,
                           device: torch.device) -> torch.Tensor:
    """[N images, M texts] ITC cosine, one block of image rows at a time so the [b, M, Q] intermediate stays small."""
    text_features = torch.cat([qformer.text_features(qformer.encode_text(ids, mask))
                               for ids, mask in zip(input_ids.split(batch_size), attention_mask.split(batch_size))])
    return torch.cat([itc_similarity(qformer.image_features(qformer.encode_image(batch)), text_features).float()
                      for batch in _image_batches(image_embeds, batch_size, device)])


def _itm_rerank_scores(qformer: QFormer, image_embeds: torch.Tensor | Iterable[torch.Tensor],
                       input_ids: torch.Tensor, attention_mask: torch.Tensor, similarity: torch.Tensor,
                       text_candidates: torch.Tensor, image_candidates: torch.Tensor, batch_size: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`rerank_score` of every candidate: [N, k] for each image's texts and [M, k] for each text's images.

    Reads the image batches once more and scores, for each batch, the pairs that involve its images.
    """
    temperature = qformer.temperature().item()  # the one ITC trained with (clamped as in training)
    text_scores = torch.empty(text_candidates.shape, device=device)
    image_scores = torch.empty(image_candidates.shape, device=device)
    start = 0
    for batch in _image_batches(image_embeds, batch_size, device):
        end = start + len(batch)
        if end > len(text_candidates):
            raise ValueError("retrieval_metrics: image_embeds gave more images on its second pass than on its "
                             "first; it must yield the same batches every time it is iterated.")
        # Image-to-text pairs: each image of this batch with its candidate texts.
        rows = torch.arange(start, end, device=device).repeat_interleave(text_candidates.shape[1])
        texts_here = text_candidates[start:end].flatten()
        itm = _itm_scores(qformer, batch[rows - start], input_ids[texts_here], attention_mask[texts_here], batch_size)
        text_scores[start:end] = rerank_score(similarity[rows, texts_here], itm, temperature).view(end - start, -1)
        # Text-to-image pairs whose candidate image lies in this batch.
        text_rows, slots = ((image_candidates >= start) & (image_candidates < end)).nonzero(as_tuple=True)
        images_here = image_candidates[text_rows, slots]
        itm = _itm_scores(qformer, batch[images_here - start], input_ids[text_rows], attention_mask[text_rows],
                          batch_size)
        image_scores[text_rows, slots] = rerank_score(similarity[images_here, text_rows], itm, temperature)
        start = end
    if start != len(text_candidates):
        raise ValueError(f"retrieval_metrics: image_embeds gave {len(text_candidates)} images on its first pass but "
                         f"{start} on its second; it must yield the same batches every time it is iterated.")
    return text_scores, image_scores
