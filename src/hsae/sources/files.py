"""Activation files on disk: `.npy` of shape (n, d), or `.safetensors` holding `activations`.

Files are memory-mapped, checked once (shape, dtype, NaN/inf) and read in shuffled batches that
depend only on (seed, step), so a resumed run continues with exactly the batches it would have had.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from hsae.errors import HsaeError
from hsae.sources.stream import DEFAULT_HELDOUT_EVERY, check_batch_request, check_split, in_split

TENSOR_NAME = "activations"
_FLOAT_DTYPES = {np.dtype("float16"), np.dtype("float32"), np.dtype("float64")}


def _load_npy(path: Path) -> Tensor:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise HsaeError(f"{path} is not a readable .npy array ({err}); save it with numpy.save") from None
    if arr.dtype not in _FLOAT_DTYPES:
        raise HsaeError(f"{path} holds {arr.dtype} data; activations must be float16 or float32")
    with warnings.catch_warnings():
        # The memory map is read-only and hsae never writes to it; torch warns about that anyway.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(arr))


def _load_safetensors(path: Path) -> Tensor:
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            if TENSOR_NAME not in keys:
                raise HsaeError(
                    f"{path} has no tensor named '{TENSOR_NAME}' (found: {', '.join(keys) or 'none'}); "
                    f"save the activations under that name"
                )
            t = fh.get_tensor(TENSOR_NAME)
    except HsaeError:
        raise
    except Exception as err:  # safetensors raises its own error types
        raise HsaeError(f"{path} is not a readable safetensors file ({err})") from None
    if not t.dtype.is_floating_point:
        raise HsaeError(f"{path}: '{TENSOR_NAME}' is {t.dtype}; activations must be floating point")
    return t


def load_activation_file(path: str | Path) -> Tensor:
    """Read and check an activation file; returns a (n, d) tensor in its stored dtype."""
    path = Path(path)
    if not path.exists():
        raise HsaeError(f"--data {path}: no such file")
    loaders = {".npy": _load_npy, ".safetensors": _load_safetensors}
    if path.suffix not in loaders:
        raise HsaeError(
            f"--data {path}: unsupported file type '{path.suffix}'; give a .npy or .safetensors file "
            "(tensor 'activations'), an hsae store folder, or 'synthetic'"
        )
    data = loaders[path.suffix](path)
    if data.dim() != 2 or data.shape[0] == 0 or data.shape[1] == 0:
        raise HsaeError(f"--data {path}: expected a 2-D array (n_tokens, d), got shape {tuple(data.shape)}")
    # Check finiteness in chunks so a large file never needs a float32 copy in memory at once.
    for start in range(0, data.shape[0], 65536):
        chunk = data[start : start + 65536].float()
        if not torch.isfinite(chunk).all():
            bad = start + int((~torch.isfinite(chunk)).any(1).nonzero()[0])
            raise HsaeError(f"--data {path}: row {bad} holds NaN or inf; clean the activations first")
    return data


class ArrayActivations:
    """An in-memory (or memory-mapped) activation matrix as an ActivationSource. `split` reads the
    training rows, the held-out ones (every `heldout_every`-th row) or all (the default for an array
    given in code; `hsae.sources.open_source` holds rows out of training by default)."""

    def __init__(
        self,
        data: Tensor,
        seed: int = 0,
        description: dict[str, Any] | None = None,
        *,
        split: str = "all",
        heldout_every: int = DEFAULT_HELDOUT_EVERY,
    ):
        check_split(split, heldout_every)
        self.data = data
        self.seed = seed
        self.d_in = int(data.shape[1])
        self.split, self.heldout_every = split, heldout_every
        self.rows = torch.nonzero(in_split(torch.arange(data.shape[0]), split, heldout_every)).squeeze(1)
        self._description = {**(description or {"kind": "array"}), "split": split, "heldout_every": heldout_every}

    @classmethod
    def from_file(
        cls, path: str | Path, seed: int = 0, *, split: str = "train", heldout_every: int = DEFAULT_HELDOUT_EVERY
    ) -> ArrayActivations:
        data = load_activation_file(path)
        description = {
            "kind": "file",
            "path": str(Path(path).resolve()),
            "rows": data.shape[0],
            "d_in": data.shape[1],
            "dtype": str(data.dtype).replace("torch.", ""),
        }
        return cls(data, seed, description, split=split, heldout_every=heldout_every)

    def epoch_rows(self) -> int:
        return int(self.rows.numel())

    def _epoch_order(self, epoch: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.rows[torch.randperm(self.rows.numel(), generator=gen)]

    def batches(self, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[Tensor]:
        check_batch_request(batch_size, rank, world_size)
        n = self.rows.numel()
        per_step = batch_size * world_size
        if per_step > n:
            raise HsaeError(
                f"the data has {n} rows ({self.split} split) but one step needs {per_step}; lower --batch-size "
                "or add data"
            )
        steps_per_epoch = n // per_step
        step = start_step
        epoch, order = -1, None
        while True:
            e, i = divmod(step, steps_per_epoch)
            if e != epoch:
                epoch, order = e, self._epoch_order(e)
            assert order is not None
            lo = i * per_step + rank * batch_size
            idx = order[lo : lo + batch_size].sort().values  # sorted reads are kinder to a mmap
            yield self.data[idx].float()
            step += 1

    def sample(self, n: int) -> Tensor:
        idx = self._epoch_order(-1)[:n].sort().values
        return self.data[idx].float()

    def describe(self) -> dict[str, Any]:
        return dict(self._description)
