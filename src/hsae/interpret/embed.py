"""Sentence embeddings from a sentence-transformers encoder (the embedded all-MiniLM-L6-v2 by default):
the mean of the last hidden states over real tokens, unit length, as its pooling and normalisation
modules compute it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class SentenceEmbedder:
    def __init__(self, loaded=None, max_length: int = 128, batch: int = 128):
        if loaded is None:
            from hsae.sources.hf import load_model

            loaded = load_model(None, device="cpu")
        self.loaded, self.max_length, self.batch = loaded, max_length, batch

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """(len(texts), d) unit embeddings; texts are batched by length (less padding), returned in order."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: Tensor | None = None
        for start in range(0, len(order), self.batch):
            idx = order[start : start + self.batch]
            inputs = self.loaded.tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.loaded.device)
            hidden = self.loaded.model(**inputs).last_hidden_state.float()
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            pooled = torch.nn.functional.normalize(pooled, dim=-1).cpu()
            if out is None:
                out = torch.empty(len(texts), pooled.shape[1])
            out[idx] = pooled
        return out if out is not None else torch.empty(0, 0)
