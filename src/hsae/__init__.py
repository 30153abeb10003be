"""hsae: hierarchical sparse autoencoders.

import hsae
sae = hsae.load("runs/minilm")
codes = sae.encode(x)          # x: float tensor (n, d_in)
x_hat = sae.decode(codes)
parents = sae.hierarchy()      # LongTensor (n_latents,), -1 = root
"""

from hsae.models import families, get_family, load
from hsae.version import __version__

__all__ = ["__version__", "load", "families", "get_family"]
