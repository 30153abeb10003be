import os

# Tests never reach a model hub (only the package registries are reachable here): fail fast, offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests are small; one intra-op thread keeps them fast and deterministic on 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("HSAE_TEST", "1")


@pytest.fixture
def synthetic_small():
    from hsae.sources.synthetic import SyntheticConfig, SyntheticSource

    return SyntheticSource(SyntheticConfig(d_in=32, n_roots=8, branching=3, depth=2, seed=1))
