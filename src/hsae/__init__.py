"""hsae: hierarchical sparse autoencoders.

import hsae
sae = hsae.load("runs/minilm")  # an hsae model folder, another library's SAE files, or hf://owner/repo/...
codes = sae.encode(x)          # x: float tensor (n, d_in)
x_hat = sae.decode(codes)
parents = sae.hierarchy()      # LongTensor (n_latents,), -1 = root
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hsae.models import families, get_family
from hsae.version import __version__

if TYPE_CHECKING:
    import torch

    from hsae.models.base import SAE


def load(source: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Any SAE hsae reads, as a model on `device`: an hsae model folder (config.json +
    weights.safetensors), a SAELens / sparsify / dictionary_learning / Gemma Scope folder or file, or
    a Hugging Face hub name `hf://owner/repo[/folder][@revision]` (through the local hub cache)."""
    from hsae.formats import load as load_any  # imported on use: formats pulls in huggingface_hub

    return load_any(source, device)


__all__ = ["__version__", "load", "families", "get_family"]
