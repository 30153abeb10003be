"""How each token reads in running text, for showing contexts token by token.

A tokenizer's own token strings ("##ing", "Ġdog", "▁dog") are not text, and decoding a token alone
loses the space before it. Decoding it after a reference token and keeping what it added gives the
piece as it appears mid-sentence (" dog", "ing", ","), for any tokenizer `transformers` can decode.
"""

from __future__ import annotations

from collections.abc import Iterable


class TokenText:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.reference = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
        self.prefix = tokenizer.decode(self.reference)
        self.cache: dict[int, str] = {}

    def piece(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            full = self.tokenizer.decode(self.reference + [token_id])
            text = full[len(self.prefix) :] if full.startswith(self.prefix) else self.tokenizer.decode([token_id])
            self.cache[token_id] = text
        return text

    def pieces(self, token_ids: Iterable[int]) -> dict[int, str]:
        return {int(t): self.piece(int(t)) for t in token_ids}


def normalise(piece: str) -> str:
    """A token piece as a search key and a word: no surrounding space, lower case."""
    return piece.strip().lower()
