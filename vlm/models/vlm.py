"""The vision-language model: Q-Former -> MLP projector -> visual tokens inside the frozen LLM's prompt.

Only three things train here: the Q-Former's image path, the projector, and LoRA matrices in the LLM (which can
be merged into its weights for export, `merge_lora`).
The backbone is never called: the model consumes cached patch embeddings [B, T, D_image].
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from vlm import distributed
from vlm.artifacts import atomic_directory
from vlm.config import LoraConfig
from vlm.models.cell_labels import labelled_slots
from vlm.models.empty_cells import EmptyCellRule
from vlm.models.greedy import TokenPicker, argmax, decode_steps, greedy_decode, mask_positions
from vlm.models.packing import TRAIN_LENGTH_MULTIPLE, PackedRows, pack, turn_attention_mask
from vlm.models.projector import Projector
from vlm.models.prompt import IGNORE_INDEX, ChatPrompt, Example
from vlm.models.qformer import QFormer
from vlm.models.spatial_prior import query_cells

# Q-Former parts that only serve the stage-1 losses; the VLM reads queries only, so these stay frozen.
STAGE1_ONLY = ("word_embeddings", "position_embeddings", "vision_proj", "text_proj", "itm_head", "lm_transform",
               "lm_bias", "temp")
VLM_CONFIG = "vlm_config.json"
ADAPTER_SUBDIR, LLM_SUBDIR = "adapter", "llm"


class VisionLanguageModel(nn.Module):
    def __init__(self, qformer: QFormer, projector: Projector, llm: PeftModel | PreTrainedModel, tokenizer,
                 system_prompt: str, llm_source: str, cell_labels: bool = False,
                 empty_cells: EmptyCellRule | None = None):
        super().__init__()
        self.qformer, self.projector, self.llm = qformer, projector, llm
        self.tokenizer = tokenizer
        self.prompt = ChatPrompt(tokenizer, system_prompt)
        self.llm_source = llm_source  # folder of the frozen base LLM, recorded so `load` can find it again
        self._freeze_stage1_heads()
        self.use_cell_labels(cell_labels)
        self.drop_empty_cells(empty_cells)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, qformer_dir: Path, llm_dir: Path, projector_hidden: int, lora: LoraConfig,
               system_prompt: str) -> VisionLanguageModel:
        """A fresh model for training: trained Q-Former, new projector, frozen LLM wrapped with new LoRA."""
        qformer = QFormer.load(qformer_dir)
        base, tokenizer = _load_llm(llm_dir)
        peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                     target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
        with _quiet_peft():
            llm = get_peft_model(base, peft_config)  # freezes every base weight
        projector = Projector(qformer.config.hidden_size, projector_hidden, base.config.hidden_size)
        return cls(qformer, projector, llm, tokenizer, system_prompt, str(llm_dir))

    @classmethod
    def load(cls, model_dir: Path, llm_dir: Path | None = None) -> VisionLanguageModel:
        """Load a model written by `save` or `write`.

        The LLM comes from `llm_dir` if given, else from the folder's own `llm/` (a self-contained export), else
        from the recorded base-LLM folder. A folder with a merged LLM (`"lora": "merged"`) has no adapter.
        """
        model_dir = Path(model_dir)
        config_path = model_dir / VLM_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: is {model_dir} a trained model (train_vlm output)?")
        config = json.loads(config_path.read_text())
        own_llm = model_dir / LLM_SUBDIR
        merged = config.get("lora") == "merged"
        if merged and llm_dir is None and not own_llm.is_dir():
            raise FileNotFoundError(f"{own_llm} not found: {model_dir} holds a merged model, whose LLM is there")
        base, tokenizer = _load_llm(Path(llm_dir or (own_llm if own_llm.is_dir() else config["llm_source"])))
        with _quiet_peft():
            llm = base if merged else PeftModel.from_pretrained(base, model_dir / ADAPTER_SUBDIR)
        projector = Projector(**config["projector"])
        projector.load_state_dict(load_file(model_dir / "projector.safetensors"))
        qformer = QFormer.load(model_dir / "qformer")
        empty_cells = EmptyCellRule.from_dict(config["empty_cells"]) if config.get("empty_cells") else None
        return cls(qformer, projector, llm, tokenizer, config["system_prompt"], config["llm_source"],
                   cell_labels=config.get("cell_labels", False), empty_cells=empty_cells).eval()

    def save(self, out_dir: Path) -> None:
        """Q-Former, projector and LoRA adapter (peft format) into one folder, atomically."""
        with atomic_directory(out_dir) as tmp:
            self.write(tmp)

    def write(self, folder: Path, include_llm: bool = False) -> None:
        """Write the model's files into an existing `folder`: Q-Former, projector, `vlm_config.json`, the LoRA
        adapter. With `include_llm` the LLM goes into `llm/` too, so that the folder loads with nothing else: the
        merged model after `merge_lora` (then there is no adapter), else a copy of the base LLM's folder."""
        folder = Path(folder)
        merged = not isinstance(self.llm, PeftModel)
        if merged and not include_llm:
            raise ValueError("the LoRA is merged into the LLM, which is stored nowhere yet: use include_llm=True")
        self.qformer.save(folder / "qformer")
        save_file({k: v.contiguous().cpu() for k, v in self.projector.state_dict().items()},
                  folder / "projector.safetensors")
        if merged:
            self.llm.save_pretrained(folder / LLM_SUBDIR)
            self.tokenizer.save_pretrained(folder / LLM_SUBDIR)
        else:
            self.llm.save_pretrained(folder / ADAPTER_SUBDIR)
            _sort_target_modules(folder / ADAPTER_SUBDIR / "adapter_config.json")
            if include_llm:
                shutil.copytree(self.llm_source, folder / LLM_SUBDIR)
        config = {"projector": self.projector.config(), "system_prompt": self.prompt.system_prompt,
                  "llm_source": LLM_SUBDIR if include_llm else self.llm_source,
                  "lora": "merged" if merged else "adapter", "cell_labels": self.cell_labels,
                  "empty_cells": self.empty_cells.to_dict() if self.empty_cells else None}
        (folder / VLM_CONFIG).write_text(json.dumps(config, indent=2))

    def merge_lora(self) -> None:
        """Fold the LoRA matrices into the LLM's weights (peft merge_and_unload): a plain LLM, same outputs."""
        if isinstance(self.llm, PeftModel):
            self.llm = self.llm.merge_and_unload()

    @property
    def pad_id(self) -> int:
        """Filler id for padding and visual slots; tokenizers without a pad token pad with end-of-turn."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.prompt.end_of_turn_id

    @property
    def base_llm(self) -> nn.Module:
        """The causal LM under the peft wrapper (LoRA layers are injected in place, so they run here too), or
        the LLM itself once the LoRA is merged."""
        return self.llm.get_base_model() if isinstance(self.llm, PeftModel) else self.llm

    def _freeze_stage1_heads(self) -> None:
        for name, param in self.qformer.named_parameters():
            text_only_ffn = ".text_ffn." in name and self.qformer.config.separate_query_ffn
            if name.split(".")[0] in STAGE1_ONLY or text_only_ffn:
                param.requires_grad_(False)

    def trainable_parameter_counts(self) -> dict[str, int]:
        """How many parameters train, per part (LoRA counted inside the LLM), and how many are frozen."""
        def count(module: nn.Module, trainable: bool) -> int:
            return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)
        return {
            "trainable_qformer": count(self.qformer, True),
            "trainable_projector": count(self.projector, True),
            "trainable_lora": count(self.llm, True),
            "frozen": count(self, False),
        }

    def use_cell_labels(self, on: bool) -> None:
        """Put each grid cell's name in words before its visual tokens (vlm/models/cell_labels.py); needs the
        Q-Former's spatial grid, as it is now (call after `qformer.use_spatial_grid`)."""
        grid = self.qformer.config.spatial_grid
        if on and not grid:
            raise ValueError("cell labels name the cells of the Q-Former's spatial grid, and it has none "
                             "(train_vlm.align.spatial_grid: 0); set train_vlm.align.cell_labels: false")
        layout = labelled_slots(self.tokenizer, self.qformer.config.num_queries, grid) if on else []
        # the label token ids and where the queries go in the visual block; empty: plain queries, no labels
        self._label_ids = torch.tensor([self.pad_id if t is None else t for t in layout], dtype=torch.long)
        self._is_query = torch.tensor([t is None for t in layout], dtype=torch.bool)
        # the grid cell of every position of the block (a label belongs to the queries after it; -1: no cell)
        cells = query_cells(self.qformer.config.num_queries, grid) if on else []
        queries_before = (self._is_query.cumsum(0) - self._is_query.long()).tolist()
        self._position_cell = torch.tensor([-1 if cells[q] is None else cells[q] for q in queries_before],
                                           dtype=torch.long)
        self._query_cell = torch.tensor([-1 if c is None else c for c in cells], dtype=torch.long)
        self.empty_cells = None  # a new layout: any rule for leaving cells out must be set again

    def drop_empty_cells(self, rule: EmptyCellRule | None) -> None:
        """Leave the cells whose slots all name " none" out of the visual block, label and slots
        (vlm/models/empty_cells.py); None reads every cell. Needs the cell labels (call after `use_cell_labels`)."""
        if rule is not None and not self.cell_labels:
            raise ValueError("only labelled cells can be left out (the labels say which cells remain); set "
                             "train_vlm.align.cell_labels: true, or train_vlm.align.drop_empty_cells: false")
        self.empty_cells = rule

    @property
    def cell_labels(self) -> bool:
        return len(self._label_ids) > 0

    @property
    def num_visual_tokens(self) -> int:
        """Tokens of the whole visual block: the queries, and the cell labels between them (with empty cells
        left out, a row's block is shorter)."""
        return len(self._label_ids) if self.cell_labels else self.qformer.config.num_queries

    @property
    def num_shared_tokens(self) -> int:
        """Tokens every turn of a row sees before its own: the system turn and the visual block."""
        return len(self.prompt.prefix_ids) + self.num_visual_tokens

    # ------------------------------------------------------------------ forward

    def query_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B, T, D_image] cached patch embeddings -> [B, Q, D_llm] the queries, through the projector."""
        return self.projector(self.qformer.encode_image(image_embeds))

    def visual_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B, T, D_image] cached patch embeddings -> [B, V, D_llm] the visual block for the LLM: the query
        tokens, with the cell labels' word embeddings between them when `cell_labels` is on."""
        return self._with_labels(self.query_tokens(image_embeds))

    def _with_labels(self, queries: torch.Tensor) -> torch.Tensor:
        if not self.cell_labels:
            return queries
        labels = self.llm.get_input_embeddings()(self._label_ids.to(queries.device)).to(queries.dtype)
        is_query = self._is_query.to(queries.device)[None, :, None]
        return labels.expand(len(queries), -1, -1).masked_scatter(is_query, queries)

    def visual_block(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, V, D_llm] `visual_tokens`, [B, V] True where the LLM reads the token): every token, or with
        `empty_cells` all but those of the cells found empty."""
        queries = self.query_tokens(image_embeds)
        tokens = self._with_labels(queries)
        if self.empty_cells is None:
            return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        cell = self._position_cell.to(tokens.device)
        dropped = self.cells_found_empty(queries)[:, cell.clamp(min=0)] & (cell >= 0)  # [B, V]
        return tokens, ~dropped

    def cells_found_empty(self, queries: torch.Tensor) -> torch.Tensor:
        """[B, Q, D_llm] query tokens -> [B, G * G] True for the grid cells `empty_cells` finds empty."""
        grid = self.qformer.config.spatial_grid
        return self.empty_cells.empty(queries, self.llm.get_input_embeddings().weight,
                                      self._query_cell.to(queries.device), grid * grid)

    def build_inputs(self, image_embeds: torch.Tensor, rows: Sequence[Sequence[Example]], left_pad: bool
                     ) -> tuple[torch.Tensor, PackedRows]:
        """(inputs_embeds [B, L, D], token layout) for a batch of rows, each the turns about one image.

        Layout per row: system turn | visual tokens | turn 1 | turn 2 | ... (see `vlm/models/packing.py`).
        Left padding for generation (one turn per row, all rows end together), right padding for training (to a
        multiple of TRAIN_LENGTH_MULTIPLE tokens).
        """
        self._check_context(rows, image_embeds.shape[0])
        visual, keep = self.visual_block(image_embeds)
        layout = pack(self.prompt.prefix_ids, keep.sum(1).tolist(), rows, self.pad_id, left_pad,
                      length_multiple=1 if left_pad else TRAIN_LENGTH_MULTIPLE).to(visual.device)
        embeds = self.llm.get_input_embeddings()(layout.ids).to(visual.dtype)
        embeds = embeds.masked_scatter(layout.is_visual[..., None], visual[keep])  # row by row, in order
        return embeds, layout

    def _check_context(self, rows: Sequence[Sequence[Example]], batch: int) -> None:
        """Every turn must fit the LLM's context after the shared part (turns restart their positions there)."""
        if len(rows) != batch:
            raise ValueError(f"{len(rows)} rows of turns for {batch} images; give one row per image")
        context = getattr(self.base_llm.config, "max_position_embeddings", None)
        if context is None:
            return
        shared = self.num_shared_tokens
        for turns in rows:
            for turn in turns:
                length = shared + turn.num_tokens
                if length > context:
                    text = self.tokenizer.decode(turn.user_ids, skip_special_tokens=True).strip()
                    raise ValueError(f"a prompt of {length} tokens (system prompt + visual tokens: {shared}) exceeds "
                                     f"the LLM's context of {context} tokens; shorten this question or answer: "
                                     f"{text[:80]!r}...")

    def forward(self, image_embeds: torch.Tensor, rows: Sequence[Sequence[Example]], average: str = "token"
                ) -> torch.Tensor:
        """Cross-entropy over the answer tokens (incl. end-of-turn) of every turn of every row: the mean over
        tokens (`average="token"`), or over turns of each turn's mean (`"turn"`, so that a one-word answer
        weighs as much as a long caption)."""
        embeds, layout = self.build_inputs(image_embeds, rows, left_pad=False)
        base = self.base_llm
        mask = turn_attention_mask(layout.segments, base.config._attn_implementation, embeds.dtype)
        hidden = base.model(inputs_embeds=embeds, attention_mask=mask, position_ids=layout.position_ids).last_hidden_state
        # Position t predicts token t+1 (answers never open a turn, so the shift stays inside the turn). Only
        # answer tokens are targets, so the vocabulary projection (a fifth of SmolLM2's FLOPs) runs for those alone.
        targets = layout.labels[:, 1:]
        is_target = targets != IGNORE_INDEX
        logits = base.lm_head(hidden[:, :-1][is_target])
        token_losses = F.cross_entropy(logits.float(), targets[is_target], reduction="none")
        if average == "token":
            return distributed.global_mean(token_losses.sum(), len(token_losses))  # torchrun: all ranks' tokens
        if average != "turn":
            raise ValueError(f"average must be 'token' or 'turn', got {average!r}")
        # A turn is (row, segment); weigh each token by 1 / (target tokens in its turn).
        rows_of = torch.arange(len(targets), device=targets.device)[:, None].expand_as(targets)
        turn_keys = rows_of[is_target] * (int(layout.segments.max()) + 1) + layout.segments[:, 1:][is_target]
        _, turn_of_token, turn_sizes = torch.unique(turn_keys, return_inverse=True, return_counts=True)
        total = (token_losses / turn_sizes[turn_of_token]).sum()
        return distributed.global_mean(total, len(turn_sizes))

    @torch.inference_mode()
    def generate(self, image_embeds: torch.Tensor, instructions: Sequence[str], max_new_tokens: int = 40,
                 num_beams: int = 1, image_index: Sequence[int] | torch.Tensor | None = None) -> list[str]:
        """Greedy (or beam) decoding, batched with left padding and the KV cache; stops at end-of-turn (greedy:
        each row as it ends, `vlm/models/greedy.py`).

        Instruction i is about image `image_index[i]` of `image_embeds` (default: image i). Greedy decoding runs
        the shared part of the prompt (system turn + visual tokens) once per image and lets every instruction
        about that image start from a copy of its KV cache: with several questions per image, most of the
        prompt is that shared part.
        """
        image_embeds = image_embeds.to(next(self.projector.parameters()).device)  # callers may pass CPU tensors
        if image_index is None:
            image_index = range(len(instructions))
        image_index = torch.as_tensor(list(image_index), dtype=torch.long, device=image_embeds.device)
        if len(image_index) != len(instructions):
            raise ValueError(f"{len(instructions)} instructions but {len(image_index)} image indices")
        rows = [[self.prompt.example(text)] for text in instructions]
        if num_beams == 1:
            self._check_context(rows, len(rows))  # `build_inputs` checks the rows of the other path
            ids, mask, cache = self._shared_prefix_inputs(image_embeds, image_index, [t[0].user_ids for t in rows])
            output = greedy_decode(self.base_llm, ids, mask, cache, max_new_tokens, self.prompt.end_of_turn_id,
                                   self.pad_id)
        else:
            embeds, layout = self.build_inputs(image_embeds[image_index], rows, left_pad=True)
            output = self.llm.generate(
                inputs_embeds=embeds, attention_mask=layout.attention_mask, max_new_tokens=max_new_tokens,
                num_beams=num_beams, do_sample=False, eos_token_id=self.prompt.end_of_turn_id,
                pad_token_id=self.pad_id,
            )
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    def decode_steps(self, image_embeds: torch.Tensor, prompts: Sequence[tuple[Sequence[int], Example]],
                     max_new_tokens: int | Sequence[int], pick: TokenPicker = argmax, stop: torch.Tensor | None = None,
                     seen: Sequence[bool] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`vlm/models/greedy.py`'s `decode_steps` for prompts of their own: prompt i = (system turn ids,
        Example whose `user_ids` end with the assistant header; `ChatPrompt.conversation`) about image i.
        `seen[i]` False: prompt i has no image, and its visual block is left out (image i is a placeholder).
        Yields (rows, tokens) per step; `pick` chooses the tokens (default greedy), `stop` ends rows early."""
        image_embeds = image_embeds.to(next(self.projector.parameters()).device)
        index = torch.arange(len(prompts), device=image_embeds.device)
        ids, mask, cache = self._shared_prefix_inputs(image_embeds, index, [example.user_ids for _, example in prompts],
                                                      [system for system, _ in prompts], seen)
        yield from decode_steps(self.base_llm, ids, mask, cache, max_new_tokens, self.prompt.end_of_turn_id, pick,
                                stop)

    def _shared_prefix_inputs(self, image_embeds: torch.Tensor, image_index: torch.Tensor,
                              users: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]] | None = None,
                              seen: Sequence[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor, object]:
        """(ids [B, P + W], attention mask, KV cache of the P shared tokens, one copy per row) for greedy decoding.

        Row layout: the shared part (cached: its ids are placeholders that never get embedded), left padding,
        then the user turn (`users[row]`). The mask skips the padding, so positions run on from the shared part
        exactly as in a row without padding (generation derives position ids from the mask). Image i's shared
        part is its system turn (`prefixes[i]`, default the trained one) and its visual block (none where
        `seen[i]` is False). With empty cells left out, other system prompts or no image, the images' shared parts
        differ in length: each is left-padded to the longest, masked the same way.
        """
        prefixes = [tuple(p) for p in prefixes] if prefixes is not None else [self.prompt.prefix_ids] * len(image_embeds)
        width = max(map(len, prefixes))
        prefix_ids = torch.full((len(prefixes), width), self.pad_id, dtype=torch.long)
        prefix_keep = torch.zeros(len(prefixes), width, dtype=torch.bool)
        for row, prefix in enumerate(prefixes):
            prefix_ids[row, :len(prefix)] = torch.tensor(prefix, dtype=torch.long)
            prefix_keep[row, :len(prefix)] = True
        system = self.llm.get_input_embeddings()(prefix_ids.to(image_embeds.device))
        visual, keep = self.visual_block(image_embeds)
        if seen is not None:
            keep = keep & torch.tensor(list(seen), dtype=torch.bool, device=keep.device)[:, None]
        tokens = torch.cat([system.to(visual.dtype), visual], dim=1)
        keep = torch.cat([prefix_keep.to(keep.device), keep], dim=1)
        shared, shared_mask = _right_aligned(tokens, keep)
        positions = mask_positions(shared_mask)
        # logits_to_keep=1: the vocabulary projection of the shared tokens would be thrown away
        cache = self.base_llm(inputs_embeds=shared, attention_mask=shared_mask, position_ids=positions,
                              use_cache=True, logits_to_keep=1).cache
        cache.batch_select_indices(image_index)
        width, length = max(map(len, users)), shared.shape[1]
        ids = torch.full((len(users), length + width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        mask[:, :length] = shared_mask[image_index].cpu()
        for row, user in enumerate(users):
            ids[row, length + width - len(user):] = torch.tensor(user)
            mask[row, length + width - len(user):] = 1
        return ids.to(image_embeds.device), mask.to(image_embeds.device), cache


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft reads transformers' deprecated `is_gradient_checkpointing` as it wraps the LLM: a FutureWarning about
    the two libraries' internals, printed by every stage, `vlm caption` and `vlm ask`, that no user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _right_aligned(tokens: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, S, D], keep [B, S] -> ([B, S', D] each row's kept tokens in order, left-padded with zeros to the
    longest row's S', [B, S'] attention mask: 1 on the kept tokens)."""
    lengths = keep.sum(1)
    width = int(lengths.max())
    mask = torch.arange(width, device=keep.device)[None] >= (width - lengths)[:, None]
    aligned = tokens.new_zeros(len(keep), width, tokens.shape[-1]).masked_scatter(mask[..., None], tokens[keep])
    return aligned, mask.long()


def _sort_target_modules(adapter_config: Path) -> None:
    """peft keeps `target_modules` as a set and writes it in set order, which changes with Python's string hashing
    from one process to the next; sorted, the same training writes byte-identical files (one DVC hash)."""
    config = json.loads(adapter_config.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _load_llm(llm_dir: Path):
    if not (Path(llm_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{llm_dir}: no LLM folder there (config.json missing); run `dvc repro weights`")
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    model.requires_grad_(False)
    return model, tokenizer
