"""BLIP-2 stage-1 objectives for the Q-Former: contrastive (ITC), matching (ITM) and captioning (ITG).

Positives are defined by content, not by batch position: a batch may hold several captions of the same image, or
two images whose captions are the same text (the synthetic scenes repeat short captions: 6% of the default train
captions belong to more than one image), and treating those as negatives would punish the model for being right.
A pair is positive when its image and its text come from the same image or its text is the same (token for token)
as that image's caption in the batch (`positive_pairs`). So
* ITC uses soft targets spread evenly over every positive in-batch pair;
* ITM never samples a positive pair as a "hard negative".

Distributed training: `gather_fn` concatenates a tensor from all ranks along dim 0, keeping the gradient for the
local part (e.g. an all_gather-with-grad); it is applied to the ITC features, the integer image ids and the
caption token ids. Every rank then computes the ITC loss over the whole global batch (an [N, N, Q] similarity
tensor), so the loss is the same everywhere; with gather_fn = identity (one process) nothing changes. ITM hard
negatives are mined inside the local batch only (BLIP-2 mines across ranks; local mining avoids gathering image
embeddings).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlm import distributed
from vlm.models.qformer import QFormer

GatherFn = Callable[[torch.Tensor], torch.Tensor]
LOSS_NAMES = ("itc", "itm", "itg")


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def positive_pairs(image_ids: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Bool [N, N] for a batch of N (image, caption) rows: True where image i and text j match, i.e. rows i and j
    show the same image (equal ids) or carry the same caption (equal token ids, padding included: a batch shares
    its padded width). Symmetric."""
    same_image = image_ids[:, None] == image_ids[None, :]
    same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(dim=-1)
    return same_image | same_text


def itc_similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [Ni, Nt]: for each image the best-matching of its queries, as in BLIP-2.

    image_features [Ni, Q, E] and text_features [Nt, E] must be L2-normalised.
    """
    return torch.einsum("iqe,te->itq", image_features, text_features).amax(dim=-1)


def itc_loss(image_features: torch.Tensor, text_features: torch.Tensor, positives: torch.Tensor,
             temperature: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of image->text and text->image similarities with soft positive targets.

    positives [N, N] (symmetric, `positive_pairs`): row i's target puts equal mass on each of its positive columns
    (itself included).
    """
    logits = itc_similarity(image_features, text_features).float() / temperature  # [N, N], images x texts
    positives = positives.float()
    targets = positives / positives.sum(dim=1, keepdim=True)  # symmetric, so valid for both directions
    image_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def sample_hard_negatives(similarity: torch.Tensor, is_positive: torch.Tensor,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row pick one column with probability softmax(similarity) over the row's negatives.

    Positives get probability exactly 0, so they can never be drawn. Returns (column index [N], has_negative [N]);
    rows without any negative (every candidate shows the same image) get index 0 and has_negative False and must
    be dropped by the caller.
    """
    has_negative = ~is_positive.all(dim=1)
    logits = similarity.float().masked_fill(is_positive, float("-inf"))
    # Rows without negatives would be all -inf (NaN softmax); give them a dummy uniform row instead.
    logits[~has_negative] = 0.0
    probabilities = torch.softmax(logits, dim=1)
    # Sample where the generator lives (a CPU generator stays usable for a GPU batch); the matrix is only [B, B].
    sampling_device = generator.device if generator is not None else probabilities.device
    picks = torch.multinomial(probabilities.to(sampling_device), 1, generator=generator)
    picks = picks.squeeze(1).to(similarity.device)
    return torch.where(has_negative, picks, torch.zeros_like(picks)), has_negative


def itm_loss(qformer: QFormer, image_embeds: torch.Tensor, image_mask: torch.Tensor | None,
             input_ids: torch.Tensor, attention_mask: torch.Tensor, similarity: torch.Tensor,
             is_positive: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary match / no-match cross-entropy over [positive pairs ; image + hard negative text ;
    hard negative image + text], labels [1 ; 0 ; 0]. `similarity` [N, N] (images x texts, already divided by
    the temperature) guides the sampling; `is_positive` [N, N] (`positive_pairs`) is never sampled.
    """
    with torch.no_grad():
        negative_text, image_has_negative = sample_hard_negatives(similarity, is_positive, generator)
        negative_image, text_has_negative = sample_hard_negatives(similarity.t(), is_positive, generator)
    images_with_negative = image_has_negative.nonzero().squeeze(1)
    texts_with_negative = text_has_negative.nonzero().squeeze(1)
    everyone = torch.arange(len(is_positive), device=is_positive.device)

    image_index = torch.cat([everyone, images_with_negative, negative_image[texts_with_negative]])
    text_index = torch.cat([everyone, negative_text[images_with_negative], texts_with_negative])
    labels = torch.cat([torch.ones_like(everyone), torch.zeros_like(images_with_negative),
                        torch.zeros_like(texts_with_negative)])

    output = qformer(image_embeds[image_index], input_ids[text_index], attention_mask[text_index], mode="itm",
                     image_mask=None if image_mask is None else image_mask[image_index])
    return F.cross_entropy(qformer.itm_logits(output.query_hidden).float(), labels)


def itg_loss(qformer: QFormer, image_embeds: torch.Tensor, image_mask: torch.Tensor | None,
             input_ids: torch.Tensor, attention_mask: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Caption language-model loss conditioned on the queries (multimodal causal mask).

    Position 0 ([CLS]) is replaced by the [DEC] token, as BLIP-2 does, and each position predicts the next token;
    padding is never a target. BLIP-2 uses label_smoothing=0.1.
    """
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = qformer.config.dec_token_id
    output = qformer(image_embeds, decoder_ids, attention_mask, mode="itg", image_mask=image_mask)
    logits = qformer.lm_logits(output.text_hidden[:, :-1])
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                            label_smoothing=label_smoothing, reduction="sum")
    return distributed.global_mean(total, int((targets != -100).sum()))  # mean over all ranks' tokens


def _check_weights(weights: dict[str, float]) -> None:
    unknown = sorted(set(weights) - set(LOSS_NAMES))
    if unknown:
        raise ValueError(f"stage1_losses: unknown loss weights {unknown}; allowed keys are {list(LOSS_NAMES)}.")
    if any(value < 0 for value in weights.values()):
        raise ValueError(f"stage1_losses: loss weights must be >= 0, got {weights}.")
    if not any(weights.get(name, 0.0) > 0 for name in LOSS_NAMES):
        raise ValueError(f"stage1_losses: every loss weight is 0 in {weights}; switch at least one loss on.")


def stage1_losses(qformer: QFormer, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, image_ids: torch.Tensor, weights: dict[str, float],
                  generator: torch.Generator | None = None, gather_fn: GatherFn | None = None,
                  image_mask: torch.Tensor | None = None, itg_label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """All active stage-1 losses for one batch of (image, caption) pairs.

    image_embeds [B, T, Di] (frozen backbone output), input_ids / attention_mask [B, L] (with [CLS] first),
    image_ids [B] (equal ids = same image; rows whose captions are the same text match each other too). weights
    maps "itc" / "itm" / "itg" to a factor; a missing key or 0 switches that loss off and skips its compute.
    Returns "loss" (weighted sum) and each active loss, detached.
    """
    _check_weights(weights)
    active = {name: weights[name] for name in LOSS_NAMES if weights.get(name, 0.0) > 0}
    gather = gather_fn or _identity
    losses: dict[str, torch.Tensor] = {}

    if "itc" in active or "itm" in active:
        # ITM needs the ITC similarity to mine hard negatives; without ITC it is computed without gradient.
        with torch.set_grad_enabled(torch.is_grad_enabled() and "itc" in active):
            image_features = qformer.image_features(qformer.encode_image(image_embeds, image_mask))
            text_features = qformer.text_features(qformer.encode_text(input_ids, attention_mask))
        if "itc" in active:
            positives = positive_pairs(gather(image_ids), gather(input_ids))
            losses["itc"] = itc_loss(gather(image_features), gather(text_features), positives, qformer.temperature())
        if "itm" in active:
            # BLIP-2 samples from softmax(sim / temp): sharper than raw cosine, so negatives are truly hard.
            similarity = itc_similarity(image_features.detach(), text_features.detach())
            similarity = similarity / qformer.temperature().detach()
            losses["itm"] = itm_loss(qformer, image_embeds, image_mask, input_ids, attention_mask, similarity,
                                     positive_pairs(image_ids, input_ids), generator)
    if "itg" in active:
        losses["itg"] = itg_loss(qformer, image_embeds, image_mask, input_ids, attention_mask, itg_label_smoothing)

    total = sum(active[name] * loss for name, loss in losses.items())
    return {"loss": total, **{name: loss.detach() for name, loss in losses.items()}}
