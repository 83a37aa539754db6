"""Incremental detokenization: token ids in, text deltas out, never a broken character.

Decoding one token at a time is wrong for most tokenizers: a character may span several byte
tokens, and sentencepiece-style decoders drop or keep a leading space depending on what came
before. So each push decodes a short window -- the ids of the previous delta ("prefix") plus the
new ones -- and emits only the text the new ids added. While the window's text ends in U+FFFD
(an incomplete UTF-8 sequence) nothing is emitted and the ids wait for the rest of the character.
The window never holds more than the last delta and the pending ids, so a push costs
O(new tokens), not O(sequence length).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizer_service.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# How many context ids seed the window: enough for a leading-space decision.
CONTEXT_WINDOW = 6


class IncrementalDecoder:
    """Turns a stream of token ids of one sequence into text deltas.

    Concatenating every `push` result and the final `flush` equals
    `tokenizer.decode(all_ids, skip_special_tokens)`. `context_ids` (e.g. the prompt) are not
    turned into text; they only give the first streamed ids their context.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        context_ids: Sequence[int] = (),
        skip_special_tokens: bool = False,
    ) -> None:
        context = list(context_ids)[-CONTEXT_WINDOW:]
        tokenizer.validate_ids(context)
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = context
        self._prefix = 0  # window start: the ids of the last delta (or the context)
        self._read = len(context)  # ids before this were already turned into text

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode_unchecked(self._ids[start:end], self._skip)

    def push(self, ids: Sequence[int]) -> str:
        """Add new ids; return the text they completed ("" while a character is incomplete)."""
        if not ids:
            return ""
        self._tokenizer.validate_ids(ids)
        return self.push_unchecked(ids)

    def push_unchecked(self, ids: Sequence[int]) -> str:
        """push() for ids the caller has already checked against the vocabulary."""
        if not ids:
            return ""
        self._ids.extend(ids)
        if self._ids[-1] in self._tokenizer.grouped_byte_ids:
            return ""  # the decoder judges a byte run as a whole: wait for its end
        prefix_text = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        if len(text) <= len(prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return ""
        # Drop ids before the new window so memory and work stay bounded.
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """Return whatever is still held back (incomplete bytes become U+FFFD, as in decode)."""
        prefix_text = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        return text[len(prefix_text) :] if len(text) > len(prefix_text) else ""
