"""The Q-Former: a BERT encoder that turns frozen image patch embeddings into a few query vectors.

BLIP-2 idea in one paragraph: a small set of learnable "query" vectors is prepended to the text tokens and the
whole sequence goes through ONE BERT stack. Every few layers the query positions (and only they) cross-attend to
the frozen image patch embeddings. Which positions may see which is decided entirely by the self-attention mask,
so the same weights serve three objectives (see `vlm/losses.py`):

* ITC (contrastive): queries and text are encoded separately (`unimodal_mask`);
* ITM (matching): queries and text see each other (`bidirectional_mask`);
* ITG (captioning): queries see only queries, each text token sees all queries and earlier text
  (`multimodal_causal_mask`), so the caption has to be read out of the queries.

After stage 1 the VLM only needs `encode_image`: its output [B, Q, H] is what the projector feeds to the LLM.

Design decisions (and why):
* Written from scratch instead of subclassing transformers' BertModel, whose internals change between versions.
  `from_bert` maps a standard HF BERT checkpoint onto this module; with no queries the text path is exactly BERT.
* BERT adds a token-type embedding to every token. We only ever use type 0, so at load time that vector is folded
  into the position embeddings (exactly equivalent, one parameter table fewer).
* Queries get the embedding LayerNorm but no position embeddings: they are an unordered set, as in BLIP-2.
* Text positions start at 0 after the queries, so a caption is embedded the same with or without queries.
* The LM head decoder is tied to the word embeddings (as in BERT), so adding the [DEC] token needs one new row.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from vlm.models.spatial_prior import LEGACY_WIDTH_IN_CELLS, cross_attention_bias, queries_per_cell

CONFIG_FILE = "qformer_config.json"
WEIGHTS_FILE = "model.safetensors"
DEC_TOKEN = "[DEC]"
INIT_STD = 0.02
TEMPERATURE_INIT = 0.07
# Top-level parts BERT has no weights for (besides every layer's cross-attention): stage 1 may train them faster.
# The LM head counts as new: a plain BertModel checkpoint (the bundled MiniLM) has none.
NEW_PARTS = ("query_tokens", "vision_proj", "text_proj", "itm_head", "temp", "lm_transform", "lm_bias")
TEMPERATURE_RANGE = (0.001, 0.5)
WORD_KEY = "embeddings.word_embeddings.weight"
POSITION_KEY = "embeddings.position_embeddings.weight"
TOKEN_TYPE_KEY = "embeddings.token_type_embeddings.weight"

Mode = Literal["itc", "itm", "itg"]

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass
class QFormerConfig:
    """Every size the Q-Former needs; saved next to the weights as JSON."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int
    num_queries: int
    image_hidden_size: int
    dec_token_id: int  # replaces [CLS] at position 0 for captioning (ITG)
    cross_attention_freq: int = 2  # layer i cross-attends to the image when i % freq == 0
    separate_query_ffn: bool = True
    embed_dim: int = 256  # ITC projection width
    max_text_len: int = 64
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    hidden_act: str = "gelu"
    spatial_grid: int = 0  # > 0: each query starts out looking at its cell of a G x G grid (models/spatial_prior.py)
    # the width of that look (sigma, in cells); the default is what configs saved without the key were trained with
    spatial_width: float = LEGACY_WIDTH_IN_CELLS

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"QFormerConfig: hidden_size {self.hidden_size} must be divisible by "
                             f"num_heads {self.num_heads}.")
        if self.cross_attention_freq < 1:
            raise ValueError(f"QFormerConfig: cross_attention_freq must be >= 1, got {self.cross_attention_freq}.")
        if self.num_queries < 1:
            raise ValueError(f"QFormerConfig: num_queries must be >= 1, got {self.num_queries}.")
        if self.max_text_len > self.max_position:
            raise ValueError(f"QFormerConfig: max_text_len {self.max_text_len} exceeds the {self.max_position} "
                             "position embeddings of the BERT checkpoint; lower max_text_len.")
        if self.spatial_grid:
            queries_per_cell(self.num_queries, self.spatial_grid)  # enough queries for one per cell
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"QFormerConfig: hidden_act {self.hidden_act!r} is not supported; "
                             f"use one of {sorted(_ACTIVATIONS)}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> QFormerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"QFormerConfig: unknown keys {unknown}; known keys are {sorted(known)}.")
        return cls(**values)


class QFormerOutput(NamedTuple):
    query_hidden: torch.Tensor  # [B, Q, H]
    text_hidden: torch.Tensor  # [B, L, H]


# ----------------------------------------------------------------------------------------------------------------
# Attention masks. All are boolean [B, Q + L, Q + L]; True means "row position may attend to column position".
# Padding is masked per key only (like BERT), so padded rows still attend to something and never produce NaNs.
# ----------------------------------------------------------------------------------------------------------------

def _valid_keys(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    queries = torch.ones(text_mask.shape[0], num_queries, dtype=torch.bool, device=text_mask.device)
    return torch.cat([queries, text_mask.bool()], dim=1)  # [B, S]


def unimodal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITC: queries see only queries, text sees only (non-padded) text."""
    keys = _valid_keys(num_queries, text_mask)
    is_query = torch.arange(keys.shape[1], device=keys.device) < num_queries
    same_modality = is_query[:, None] == is_query[None, :]
    return same_modality[None] & keys[:, None, :]


def bidirectional_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITM: every position sees every non-padded position."""
    keys = _valid_keys(num_queries, text_mask)
    return keys[:, None, :].expand(-1, keys.shape[1], -1)


def multimodal_causal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITG: queries see all queries (never text); text token i sees all queries and text tokens up to i."""
    keys = _valid_keys(num_queries, text_mask)
    position = torch.arange(keys.shape[1], device=keys.device)
    # Column j is visible from row i if j is a query, or j is at or before i. For a query row i < Q the second
    # clause only admits queries, so queries never see text.
    allowed = (position[None, :] < num_queries) | (position[None, :] <= position[:, None])
    return allowed[None] & keys[:, None, :]


_MASKS = {"itc": unimodal_mask, "itm": bidirectional_mask, "itg": multimodal_causal_mask}


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (post-LayerNorm, as in BERT).
# ----------------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention + residual + LayerNorm. Self-attention when key_width == width, else cross-attention."""

    def __init__(self, config: QFormerConfig, key_width: int) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.dropout = config.attention_dropout
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(key_width, config.hidden_size)
        self.value = nn.Linear(key_width, config.hidden_size)
        self.output = nn.Linear(config.hidden_size, config.hidden_size)
        self.output_dropout = nn.Dropout(config.hidden_dropout)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """hidden [B, L, H] attends to context [B, S, Hk]; mask is bool [B, L, S] or [B, 1, S] (True = visible),
        or float logits added to the attention scores ([B or 1, L, S])."""
        attended = F.scaled_dot_product_attention(
            self._split_heads(self.query(hidden)),
            self._split_heads(self.key(context)),
            self._split_heads(self.value(context)),
            attn_mask=None if mask is None else mask[:, None],  # broadcast over heads
            dropout_p=self.dropout if self.training else 0.0,
        )
        attended = attended.transpose(1, 2).flatten(2)
        return self.layer_norm(hidden + self.output_dropout(self.output(attended)))


class FeedForward(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.dense_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(hidden + self.dropout(self.dense_out(self.activation(self.dense_in(hidden)))))


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, has_cross_attention: bool) -> None:
        super().__init__()
        self.self_attention = Attention(config, key_width=config.hidden_size)
        self.cross_attention = Attention(config, config.image_hidden_size) if has_cross_attention else None
        self.text_ffn = FeedForward(config)
        self.query_ffn = FeedForward(config) if config.separate_query_ffn else None

    def forward(self, hidden: torch.Tensor, self_mask: torch.Tensor | None, num_queries: int,
                image_embeds: torch.Tensor | None, cross_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = self.self_attention(hidden, hidden, self_mask)
        queries, text = hidden[:, :num_queries], hidden[:, num_queries:]
        if self.cross_attention is not None and num_queries > 0:
            # Only queries look at the image; text learns about it solely through the queries.
            queries = self.cross_attention(queries, image_embeds, cross_mask)
        query_ffn = self.query_ffn if self.query_ffn is not None else self.text_ffn
        return torch.cat([query_ffn(queries), self.text_ffn(text)], dim=1)


class LMHeadTransform(nn.Module):
    """BERT's prediction-head transform (dense + activation + LayerNorm) applied before the tied decoder."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.activation(self.dense(hidden)))


# ----------------------------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------------------------

class QFormer(nn.Module):
    def __init__(self, config: QFormerConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Randomly initialised Q-Former; use `from_bert` or `load` for real weights.

        `tokenizer` is only needed for turning strings into ids (retrieval evaluation, data prep) and is saved
        alongside the weights when present.
        """
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        hidden = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, hidden)
        self.position_embeddings = nn.Embedding(config.max_position, hidden)
        self.embed_layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_queries, hidden))
        self.layers = nn.ModuleList(
            QFormerLayer(config, has_cross_attention=i % config.cross_attention_freq == 0)
            for i in range(config.num_layers)
        )
        self.vision_proj = nn.Linear(hidden, config.embed_dim)
        self.text_proj = nn.Linear(hidden, config.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.lm_transform = LMHeadTransform(config)
        self.lm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.temp = nn.Parameter(torch.tensor(TEMPERATURE_INIT))
        self.apply(_init_bert_style)
        nn.init.normal_(self.query_tokens, std=INIT_STD)

    # ---------------------------------------------------------------- core pass

    def _embed(self, input_ids: torch.Tensor | None, batch_size: int, with_queries: bool) -> torch.Tensor:
        parts = [self.query_tokens.expand(batch_size, -1, -1)] if with_queries else []
        if input_ids is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        return self.embed_dropout(self.embed_layer_norm(torch.cat(parts, dim=1)))

    def _run(self, hidden: torch.Tensor, self_mask: torch.Tensor | None, num_queries: int,
             image_embeds: torch.Tensor | None, image_mask: torch.Tensor | None) -> torch.Tensor:
        cross_mask = None if image_mask is None else image_mask[:, None, :].bool()  # [B, 1, S]: True = visible
        if self.config.spatial_grid and image_embeds is not None and num_queries > 0:
            bias = cross_attention_bias(num_queries, image_embeds.shape[1], self.config.spatial_grid,
                                        self.config.spatial_width)
            bias = bias.to(device=image_embeds.device, dtype=image_embeds.dtype)[None]  # [1, Q, S]
            cross_mask = bias if cross_mask is None else bias.masked_fill(~cross_mask, float("-inf"))
        for layer in self.layers:
            hidden = layer(hidden, self_mask, num_queries, image_embeds, cross_mask)
        return hidden

    def _check_image(self, image_embeds: torch.Tensor) -> torch.Tensor:
        if image_embeds.ndim != 3 or image_embeds.shape[-1] != self.config.image_hidden_size:
            raise ValueError(f"QFormer: image_embeds must be [B, T, {self.config.image_hidden_size}] "
                             f"(config.image_hidden_size), got {tuple(image_embeds.shape)}.")
        return image_embeds.to(device=self.query_tokens.device, dtype=self.query_tokens.dtype)

    def use_spatial_grid(self, grid: int, width: float = LEGACY_WIDTH_IN_CELLS) -> None:
        """From now on each query attends around its cell of a grid x grid grid (0: plain queries), within a
        Gaussian of sigma `width` cells; the setting is saved with the config, which checks it (ValueError when
        there are fewer queries than cells)."""
        self.config = replace(self.config, spatial_grid=grid, spatial_width=width)

    def _check_text(self, input_ids: torch.Tensor) -> None:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_position:
            raise ValueError(f"QFormer: input_ids must be [B, L] with L <= {self.config.max_position} "
                             f"(position embeddings), got {tuple(input_ids.shape)}; truncate the text.")

    def encode_image(self, image_embeds: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Queries only (no text) -> [B, Q, H]. This is the Q-Former's output for the VLM and for ITC."""
        image_embeds = self._check_image(image_embeds)
        hidden = self._embed(None, image_embeds.shape[0], with_queries=True)
        return self._run(hidden, None, self.config.num_queries, image_embeds, image_mask)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text only (no queries, hence no image) -> [B, L, H]; identical to the source BERT's last hidden state."""
        self._check_text(input_ids)
        hidden = self._embed(input_ids, input_ids.shape[0], with_queries=False)
        key_mask = attention_mask.bool()[:, None, :]  # [B, 1, L]: mask padded keys for every row
        return self._run(hidden, key_mask, 0, None, None)

    def forward(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                mode: Mode, image_mask: torch.Tensor | None = None) -> QFormerOutput:
        """Joint pass over [queries ; text] with the self-attention mask of `mode` ("itc" | "itm" | "itg").

        The caller prepares input_ids (e.g. ITG replaces [CLS] by config.dec_token_id). For ITC the losses use
        the cheaper separate `encode_image` / `encode_text`, which give the same result.
        """
        if mode not in _MASKS:
            raise ValueError(f"QFormer.forward: mode must be one of {sorted(_MASKS)}, got {mode!r}.")
        image_embeds = self._check_image(image_embeds)
        self._check_text(input_ids)
        num_queries = self.config.num_queries
        hidden = self._embed(input_ids, input_ids.shape[0], with_queries=True)
        mask = _MASKS[mode](num_queries, attention_mask)
        hidden = self._run(hidden, mask, num_queries, image_embeds, image_mask)
        return QFormerOutput(hidden[:, :num_queries], hidden[:, num_queries:])

    # ---------------------------------------------------------------- heads

    def image_features(self, query_hidden: torch.Tensor) -> torch.Tensor:
        """ITC image features: every query projected and L2-normalised -> [B, Q, embed_dim]."""
        return F.normalize(self.vision_proj(query_hidden), dim=-1)

    def text_features(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """ITC text feature: the [CLS] output projected and L2-normalised -> [B, embed_dim]."""
        return F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)

    def new_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters BERT has no counterpart for (`NEW_PARTS`); `from_bert` initialises them fresh."""
        return [p for name, p in self.named_parameters()
                if p.requires_grad and (name.split(".")[0] in NEW_PARTS or ".cross_attention." in name)]

    def itm_logits(self, query_hidden: torch.Tensor) -> torch.Tensor:
        """Match / no-match logits [B, 2] (index 1 = match) from the query outputs averaged over queries."""
        return self.itm_head(query_hidden.mean(dim=1))

    def lm_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, L, vocab]; the decoder is the word-embedding matrix (tied, as in BERT)."""
        return F.linear(self.lm_transform(text_hidden), self.word_embeddings.weight, self.lm_bias)

    def temperature(self) -> torch.Tensor:
        """The ITC temperature, clamped in place to TEMPERATURE_RANGE like BLIP-2.

        Clamping the stored value (rather than the returned one) keeps its gradient alive at the boundary.
        Going through .data skips autograd's version check, so calling this twice in one step is safe (the second
        clamp changes nothing).
        """
        self.temp.data.clamp_(*TEMPERATURE_RANGE)
        return self.temp

    # ---------------------------------------------------------------- persistence

    @classmethod
    def from_bert(cls, bert_dir: Path, num_queries: int, cross_attention_freq: int, image_hidden_size: int,
                  separate_query_ffn: bool = True, embed_dim: int = 256, max_text_len: int = 64) -> QFormer:
        """Build a Q-Former from a Hugging Face BERT folder (config.json, model.safetensors, tokenizer files).

        Self-attention, FFN and embeddings come from BERT (the query FFN starts as a copy of the text FFN);
        cross-attention, query tokens, ITC/ITM heads are new. The LM-head transform and bias come from
        `cls.predictions.*` when the checkpoint has them (BertForPreTraining / BertForMaskedLM), else are new.
        A [DEC] token is added to the tokenizer unless it already exists; its embedding starts as a copy of
        [CLS] because it plays the same "start of sequence" role.
        """
        bert_dir = Path(bert_dir)
        bert_config = _read_bert_config(bert_dir)
        weights_path = bert_dir / WEIGHTS_FILE
        if not weights_path.is_file():
            raise FileNotFoundError(f"QFormer.from_bert: {weights_path} not found; save the BERT model with "
                                    "save_pretrained(..., safe_serialization=True).")
        weights = _normalise_bert_keys(load_file(str(weights_path)))
        tokenizer = AutoTokenizer.from_pretrained(str(bert_dir))
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
        dec_token_id = tokenizer.convert_tokens_to_ids(DEC_TOKEN)

        config = QFormerConfig(
            vocab_size=max(bert_config["vocab_size"], dec_token_id + 1),
            hidden_size=bert_config["hidden_size"],
            num_layers=bert_config["num_hidden_layers"],
            num_heads=bert_config["num_attention_heads"],
            intermediate_size=bert_config["intermediate_size"],
            max_position=bert_config["max_position_embeddings"],
            num_queries=num_queries,
            image_hidden_size=image_hidden_size,
            dec_token_id=dec_token_id,
            cross_attention_freq=cross_attention_freq,
            separate_query_ffn=separate_query_ffn,
            embed_dim=embed_dim,
            max_text_len=max_text_len,
            layer_norm_eps=bert_config.get("layer_norm_eps", 1e-12),
            hidden_dropout=bert_config.get("hidden_dropout_prob", 0.1),
            attention_dropout=bert_config.get("attention_probs_dropout_prob", 0.1),
            hidden_act=bert_config.get("hidden_act", "gelu"),
        )
        model = cls(config, tokenizer)
        model._load_bert_weights(weights, bert_config["vocab_size"], tokenizer.cls_token_id)
        return model

    def _load_bert_weights(self, weights: dict[str, torch.Tensor], bert_vocab: int, cls_token_id: int) -> None:
        verbatim = _bert_key_map(self.config)
        missing = sorted(key for key in [*verbatim.values(), WORD_KEY, POSITION_KEY] if key not in weights)
        if missing:
            raise KeyError(f"QFormer.from_bert: the BERT checkpoint lacks {len(missing)} expected weights: "
                           f"{missing}. Is it a standard BertModel / BertForPreTraining checkpoint?")
        own = self.state_dict()
        with torch.no_grad():
            for our_key, bert_key in verbatim.items():
                _copy_checked(own[our_key], weights[bert_key], our_key, bert_key)
            # The word table may have one extra row for [DEC]; it starts as a copy of [CLS].
            _copy_checked(self.word_embeddings.weight[:bert_vocab], weights[WORD_KEY], "word_embeddings", WORD_KEY)
            if self.config.dec_token_id >= bert_vocab:
                self.word_embeddings.weight[self.config.dec_token_id] = self.word_embeddings.weight[cls_token_id]
            position = weights[POSITION_KEY].clone()
            if TOKEN_TYPE_KEY in weights:
                position += weights[TOKEN_TYPE_KEY][0]  # folded, see module docstring
            _copy_checked(self.position_embeddings.weight, position, "position_embeddings", POSITION_KEY)
            self._load_optional_lm_head(weights, bert_vocab)
            for layer in self.layers:
                if layer.query_ffn is not None:
                    layer.query_ffn.load_state_dict(layer.text_ffn.state_dict())

    def _load_optional_lm_head(self, weights: dict[str, torch.Tensor], bert_vocab: int) -> None:
        head = {
            "lm_transform.dense.weight": "cls.predictions.transform.dense.weight",
            "lm_transform.dense.bias": "cls.predictions.transform.dense.bias",
            "lm_transform.layer_norm.weight": "cls.predictions.transform.LayerNorm.weight",
            "lm_transform.layer_norm.bias": "cls.predictions.transform.LayerNorm.bias",
        }
        if not all(key in weights for key in head.values()):
            return  # plain BertModel checkpoint: the LM head keeps its fresh initialisation
        own = self.state_dict()
        for our_key, bert_key in head.items():
            _copy_checked(own[our_key], weights[bert_key], our_key, bert_key)
        if "cls.predictions.bias" in weights:
            self.lm_bias[:bert_vocab] = weights["cls.predictions.bias"]

    def save(self, out_dir: Path) -> None:
        """Write model.safetensors + qformer_config.json (+ tokenizer files) atomically into out_dir."""
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            tmp_dir.chmod(0o755)  # mkdtemp makes it owner-only
            state = {key: value.detach().contiguous().cpu() for key, value in self.state_dict().items()}
            save_file(state, str(tmp_dir / WEIGHTS_FILE))
            (tmp_dir / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp_dir))
            _replace_dir(tmp_dir, out_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise

    @classmethod
    def load(cls, model_dir: Path) -> QFormer:
        """Inverse of `save`. The tokenizer is loaded when its files are present."""
        model_dir = Path(model_dir)
        config_path = model_dir / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"QFormer.load: {config_path} not found; is {model_dir} a folder written by "
                                    "QFormer.save?")
        config = QFormerConfig.from_dict(json.loads(config_path.read_text()))
        has_tokenizer = (model_dir / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir)) if has_tokenizer else None
        model = cls(config, tokenizer)
        model.load_state_dict(load_file(str(model_dir / WEIGHTS_FILE)))
        return model


# ----------------------------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------------------------

def _init_bert_style(module: nn.Module) -> None:
    """Normal(0, 0.02) weights, zero biases, unit LayerNorm: BERT's initialisation, used for all new parts."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=INIT_STD)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _read_bert_config(bert_dir: Path) -> dict:
    path = bert_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"QFormer.from_bert: {path} not found; bert_dir must be a Hugging Face BERT folder.")
    config = json.loads(path.read_text())
    if config.get("model_type", "bert") != "bert":
        raise ValueError(f"QFormer.from_bert: {path} has model_type {config['model_type']!r}; only 'bert' "
                         "checkpoints are supported (others differ in embeddings and position ids).")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"QFormer.from_bert: {path} uses position_embedding_type "
                         f"{config['position_embedding_type']!r}; only 'absolute' is supported.")
    return config


def _normalise_bert_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the "bert." prefix of pre-training checkpoints and rename old LayerNorm gamma/beta to weight/bias."""
    normalised = {}
    for key, value in weights.items():
        key = key.removeprefix("bert.")
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        normalised[key] = value
    return normalised


def _bert_key_map(config: QFormerConfig) -> dict[str, str]:
    """Our parameter name -> BERT parameter name, for every parameter copied verbatim.

    Word and position embeddings are not in this map: they need a resize / the token-type fold.
    """
    mapping = {
        "embed_layer_norm.weight": "embeddings.LayerNorm.weight",
        "embed_layer_norm.bias": "embeddings.LayerNorm.bias",
    }
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}", f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            for kind in ("weight", "bias"):
                mapping[f"{ours}.self_attention.{name}.{kind}"] = f"{theirs}.attention.self.{name}.{kind}"
        for kind in ("weight", "bias"):
            mapping[f"{ours}.self_attention.output.{kind}"] = f"{theirs}.attention.output.dense.{kind}"
            mapping[f"{ours}.self_attention.layer_norm.{kind}"] = f"{theirs}.attention.output.LayerNorm.{kind}"
            mapping[f"{ours}.text_ffn.dense_in.{kind}"] = f"{theirs}.intermediate.dense.{kind}"
            mapping[f"{ours}.text_ffn.dense_out.{kind}"] = f"{theirs}.output.dense.{kind}"
            mapping[f"{ours}.text_ffn.layer_norm.{kind}"] = f"{theirs}.output.LayerNorm.{kind}"
    return mapping


def _copy_checked(target: torch.Tensor, source: torch.Tensor, target_name: str, source_name: str) -> None:
    if target.shape != source.shape:
        raise ValueError(f"QFormer.from_bert: BERT weight {source_name} has shape {tuple(source.shape)}, "
                         f"expected {tuple(target.shape)} for {target_name}; config.json and "
                         "model.safetensors disagree.")
    target.copy_(source)


def _replace_dir(new_dir: Path, target: Path) -> None:
    """Move new_dir to target, replacing any old target; a crash never leaves a half-written target."""
    if not target.exists():
        os.replace(new_dir, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(new_dir, target)
    shutil.rmtree(old)
