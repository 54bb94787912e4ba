"""Prompt layout: the LLM's own chat template, with the visual tokens between system prompt and user turn.

    <system turn> [visual tokens] <user turn + assistant header> <answer> <end-of-turn>

The template is rendered once into token ids (the system part is the same for every example; the user part
only depends on the instruction), so no tokenisation happens in the training loop. Only the answer and the
end-of-turn token are training targets: the model must learn what to say and when to stop, not to repeat the
prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value that cross-entropy skips


@dataclass(frozen=True)
class Example:
    """One training/eval example in token ids: the user turn (instruction) and the answer (+ end-of-turn)."""

    user_ids: tuple[int, ...]
    answer_ids: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        """The tokens this turn takes in a prompt (user turn + answer)."""
        return len(self.user_ids) + len(self.answer_ids)


class ChatPrompt:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, system_prompt: str):
        if tokenizer.eos_token_id is None:
            raise ValueError("the LLM tokenizer has no EOS token: the model could never learn to stop")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.end_of_turn_id = tokenizer.eos_token_id
        system = [{"role": "system", "content": system_prompt}]
        if tokenizer.chat_template:
            self._system_text = tokenizer.apply_chat_template(system, tokenize=False)
        else:  # base models without a chat template get a plain, documented layout
            self._system_text = f"System: {system_prompt}\n"
        self.prefix_ids: tuple[int, ...] = tuple(self._encode(self._system_text))

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @lru_cache(maxsize=4096)  # noqa: B019 - a prompt object lives as long as its tokenizer
    def user_ids(self, instruction: str) -> tuple[int, ...]:
        """Token ids of the user turn plus the assistant header that starts the answer."""
        if self.tokenizer.chat_template:
            messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": instruction}]
            full = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if not full.startswith(self._system_text):
                raise ValueError("the chat template renders the system turn differently alone and with a user turn")
            text = full[len(self._system_text):]
        else:
            text = f"User: {instruction}\nAssistant:"
        return tuple(self._encode(text))

    def answer_ids(self, answer: str) -> tuple[int, ...]:
        """The answer followed by the end-of-turn token (the target that teaches the model to stop)."""
        prefix = "" if self.tokenizer.chat_template else " "
        return tuple(self._encode(prefix + answer)) + (self.end_of_turn_id,)

    def example(self, instruction: str, answer: str | None = None) -> Example:
        return Example(self.user_ids(instruction), self.answer_ids(answer) if answer is not None else ())

