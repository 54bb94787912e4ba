"""Prompt layout: the LLM's own chat template, with the visual tokens between system prompt and user turn.

    <system turn> [visual tokens] <user turn + assistant header> <answer> <end-of-turn>

and for a conversation of several turns (chat, multi-turn training), the later turns follow in the same template:

    <system turn> [visual tokens] <user 1><assistant 1> <user 2><assistant 2> ... <user n + assistant header>

The template is rendered once into token ids (the system part is the same for every example; the user part
only depends on the instruction), so no tokenisation happens in the training loop. Only the assistant's replies
and their end-of-turn tokens are training targets: the model must learn what to say and when to stop, not to
repeat the prompt (system, user turns, the template's role headers, the visual block).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from vlm.config import LLMConfig

IGNORE_INDEX = -100  # label value that cross-entropy skips


def question_instruction(question: str, llm: LLMConfig) -> str:
    """The user turn that asks `question` (training, evaluation and `ask` word it the same way)."""
    return question + llm.question_suffix


@dataclass(frozen=True)
class Example:
    """One training/eval example in token ids, everything after the visual block: the prompt (`user_ids`: the user
    turn and assistant header; for a conversation, all its earlier turns too) and the answer (+ end-of-turn).

    `targets`: (start, stop) spans of `user_ids` that are training targets as well: the earlier assistant replies
    of a conversation, each with its end-of-turn token (`ChatPrompt.conversation`); empty for one turn.
    """

    user_ids: tuple[int, ...]
    answer_ids: tuple[int, ...] = ()
    targets: tuple[tuple[int, int], ...] = ()

    @property
    def num_tokens(self) -> int:
        """The tokens this turn takes in a prompt (user turn + answer)."""
        return len(self.user_ids) + len(self.answer_ids)

    @property
    def labels(self) -> tuple[int, ...]:
        """One label per token of `user_ids + answer_ids`: the token itself on targets (the replies and their
        end-of-turn), IGNORE_INDEX on everything else."""
        labels = [IGNORE_INDEX] * len(self.user_ids) + list(self.answer_ids)
        for start, stop in self.targets:
            labels[start:stop] = self.user_ids[start:stop]
        return tuple(labels)


class ChatPrompt:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, system_prompt: str):
        if tokenizer.eos_token_id is None:
            raise ValueError("the LLM tokenizer has no EOS token: the model could never learn to stop")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.end_of_turn_id = tokenizer.eos_token_id
        self._system_text = self._render([{"role": "system", "content": system_prompt}])
        self.prefix_ids: tuple[int, ...] = tuple(self._encode(self._system_text))

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @lru_cache(maxsize=4096)  # noqa: B019 - a prompt object lives as long as its tokenizer
    def user_ids(self, instruction: str) -> tuple[int, ...]:
        """Token ids of the user turn plus the assistant header that starts the answer."""
        messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": instruction}]
        return tuple(self._encode(self._tail(self._render(messages, generation_prompt=True), self._system_text)))

    def answer_ids(self, answer: str) -> tuple[int, ...]:
        """The answer followed by the end-of-turn token (the target that teaches the model to stop)."""
        prefix = "" if self.tokenizer.chat_template else " "
        return tuple(self._encode(prefix + answer)) + (self.end_of_turn_id,)

    def example(self, instruction: str, answer: str | None = None) -> Example:
        return Example(self.user_ids(instruction), self.answer_ids(answer) if answer is not None else ())

    def system_ids(self, system_prompt: str | None = None) -> tuple[int, ...]:
        """Token ids of the system turn: the trained one (`prefix_ids`) by default, or another system prompt's."""
        if system_prompt is None or system_prompt == self.system_prompt:
            return self.prefix_ids
        return tuple(self._encode(self._render([{"role": "system", "content": system_prompt}])))

    def conversation(self, turns: Sequence[tuple[str, str | None]], system_prompt: str | None = None
                     ) -> tuple[tuple[int, ...], Example]:
        """(system turn ids, Example) of a conversation about one image: `turns` are (user text, assistant reply)
        pairs; the last reply may be None, then the Example ends with the assistant header (a prompt to generate
        from), else with that reply as its answer. Earlier replies are in `user_ids`, marked as `targets`.

        Each piece is the text the chat template adds for one more message, tokenised alone as `user_ids` and
        `answer_ids` tokenise theirs, so one turn gives exactly `(prefix_ids, example(user, reply))`. The visual
        block goes between the two parts (`vlm/models/packing.py`, `VisionLanguageModel.generate`).
        """
        if not turns:
            raise ValueError("a conversation needs at least one user turn")
        if any(reply is None for _, reply in turns[:-1]):
            raise ValueError("only the last turn of a conversation may lack the assistant's reply")
        system = self.system_prompt if system_prompt is None else system_prompt
        messages = [{"role": "system", "content": system}]
        rendered = self._render(messages)
        ids: list[int] = []
        targets: list[tuple[int, int]] = []
        answer: tuple[int, ...] = ()
        for number, (user, reply) in enumerate(turns, start=1):
            messages.append({"role": "user", "content": user})
            with_header = self._render(messages, generation_prompt=True)
            ids += self._encode(self._tail(with_header, rendered))
            if reply is None:
                break
            messages.append({"role": "assistant", "content": reply})
            rendered = self._render(messages)
            reply_ids, trailer = self._reply(self._tail(rendered, with_header))
            if number == len(turns):
                answer = reply_ids  # the template's text after the last end-of-turn is not part of the example
            else:
                targets.append((len(ids), len(ids) + len(reply_ids)))
                ids += reply_ids + trailer
        return self.system_ids(system_prompt), Example(tuple(ids), answer, tuple(targets))

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        """The conversation's text: the chat template's, or the plain layout of base models without one
        (`System: ...`, `User: ...`, `Assistant: ...` lines, the reply's end-of-turn token after each reply)."""
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        lines = {"system": "System: {}\n", "user": "User: {}\nAssistant:", "assistant": " {}" + self._eot_text + "\n"}
        return "".join(lines[m["role"]].format(m["content"]) for m in messages)

    @property
    def _eot_text(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.end_of_turn_id)

    @staticmethod
    def _tail(text: str, before: str) -> str:
        """What the chat template added to `before` to make `text` (it must only append)."""
        if not text.startswith(before):
            raise ValueError("the chat template renders the earlier messages of a conversation differently once "
                             "another message follows; this prompt layout needs one that only appends")
        return text[len(before):]

    def _reply(self, text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The template's text for one assistant message -> (reply ids + end-of-turn, ids of what follows the
        end-of-turn token, e.g. ChatML's newline: prompt, not target)."""
        cut = text.rfind(self._eot_text)
        if cut < 0:
            raise ValueError(f"the chat template does not end an assistant reply with the end-of-turn token "
                             f"{self._eot_text!r}: the model could not learn to stop")
        prefix = text[:cut]
        reply = tuple(self._encode(prefix)) + (self.end_of_turn_id,)
        return reply, tuple(self._encode(text[cut + len(self._eot_text):]))

