"""hsae: hierarchical sparse autoencoders.

import hsae
sae = hsae.load("runs/minilm")  # an hsae model folder, another library's SAE files, or hf://owner/repo/...
store = hsae.open_store("runs/store")
x = store.sample(1000)         # float tensor (n, d_in) of raw activations
codes = sae.encode(x)
x_hat = sae.decode(codes)
parents = sae.hierarchy()      # LongTensor (n_latents,), -1 = root
for rows in store.rows():      # harvest order: rows.activations[hook], token_ids, doc_ids, positions
    ...
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hsae.runtime import configure_threads, prefer_passive_waiting

prefer_passive_waiting()  # before torch starts its OpenMP runtime (hsae.runtime says why)

from hsae.models import families, get_family  # noqa: E402
from hsae.version import __version__  # noqa: E402

configure_threads()

if TYPE_CHECKING:
    import torch

    from hsae.models.base import SAE
    from hsae.store import ActivationStore


def load(source: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Any SAE hsae reads, as a model on `device`: an hsae model folder (config.json +
    weights.safetensors), a SAELens / sparsify / dictionary_learning / Gemma Scope folder or file, or
    a Hugging Face hub name `hf://owner/repo[/folder][@revision]` (through the local hub cache)."""
    from hsae.formats import load as load_any  # imported on use: formats pulls in huggingface_hub

    return load_any(source, device)


def open_store(path: str | Path, hook: str | None = None, split: str = "all") -> ActivationStore:
    """An activation store (from `hsae harvest`): `sample(n)`, `batches(...)`, `rows()` (activations
    with token ids, documents and positions, in harvest order), `text(token_ids)`, `manifest`.
    `hook` picks one of several hooks; `split` reads the training or held-out documents only."""
    from hsae.store import ActivationStore

    return ActivationStore.open(path, hook=hook, split=split)


__all__ = ["__version__", "load", "open_store", "families", "get_family"]
