"""A reply's text as its tokens come, piece by piece: right across multi-byte characters and word pieces, cut
before stop strings.

Each token's text depends on its neighbours (a byte-level BPE token may hold half a UTF-8 character; word-piece
and sentencepiece tokenizers decide spaces by what follows), so the stream decodes the whole reply so far and
hands out what it had not: text that ends in an unfinished character (U+FFFD) waits for the next token. What is
handed out is never taken back, so text that could still be the start of a stop string waits too, and so does
trailing whitespace (the finished reply is stripped, as `VisionLanguageModel.generate` strips its outputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Delta:
    """One step of one request: new reply text (may be empty: held back, or nothing new yet) and, on the request's
    last step, why it ended: "stop" (end-of-turn or a stop string) or "length" (max_tokens, or the context)."""

    text: str
    finish_reason: FinishReason | None = None


class TextStream:
    """The text of one reply, fed a token at a time (`push`), ended by `finish`."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.tokens: list[int] = []
        self.sent = ""  # the text handed out so far
        self.stopped = False  # a stop string was met: the reply is over

    def push(self, token: int) -> str:
        """Add a token; the text it makes safe to hand out (empty while held back). After a stop string, sets
        `stopped` and hands out what came before it."""
        if self.stopped:
            raise RuntimeError("the reply met a stop string and is over")
        self.tokens.append(token)
        text = self._text()
        if text.endswith("\ufffd"):  # half a character: wait for the rest of its bytes
            return ""
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._send(text[:cut].rstrip())
        return self._send(text[:len(text) - self._held_back(text)])

    def finish(self) -> str:
        """The reply ended (end-of-turn or length): the text still held back, less trailing whitespace."""
        if self.stopped:
            return ""
        return self._send(self._text().rstrip())

    @property
    def text(self) -> str:
        return self.sent

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()

    def _send(self, upto: str) -> str:
        """Hand out `upto` beyond what was sent. Decoding more tokens only appends to the text with the usual
        tokenizers; with one that rewrote earlier text, what was sent stays sent and the stream goes on after it."""
        delta = upto[len(self.sent):]
        self.sent += delta
        return delta

    def _stop_at(self, text: str) -> int | None:
        """Where the first stop string in `text` starts (they can only be in the part not yet sent)."""
        start = max(0, len(self.sent) - max((len(s) for s in self.stop), default=0))
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """How many characters at the end of `text` must wait: the longest end that begins a stop string, and
        trailing whitespace."""
        held = len(text) - len(text.rstrip())
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:size]):
                    held = size
                    break
        return held
