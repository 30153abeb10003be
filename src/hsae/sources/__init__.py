"""Where activations come from. `open_source` turns the `--data` argument into an ActivationSource.

Stores, activation files and on-the-fly sources hold every `heldout_every`-th document (or row of a
file) out of the "train" split by default; evaluation reads the "heldout" split of the same data.
"""

from __future__ import annotations

from pathlib import Path

from hsae.errors import HsaeError
from hsae.sources.base import ActivationSource
from hsae.sources.stream import DEFAULT_HELDOUT_EVERY


def open_model_source(
    model: str | None,
    hook: str | None,
    corpus: str,
    *,
    seed: int = 0,
    device: str | None = None,
    split: str = "train",
    heldout_every: int = DEFAULT_HELDOUT_EVERY,
) -> ActivationSource:
    """Activations harvested on the fly from `model` at `hook` on `corpus` (no cache on disk)."""
    from hsae.sources.hf import DEFAULT_HOOK, ModelActivationSource, load_model
    from hsae.sources.text import open_corpus

    documents = open_corpus(corpus)
    return ModelActivationSource(
        load_model(model, device=device),
        hook or DEFAULT_HOOK,
        documents,
        seed=seed,
        split=split,
        heldout_every=heldout_every,
    )


def open_source(
    data: str,
    *,
    seed: int = 0,
    synthetic: dict[str, str] | None = None,
    max_norm_ratio: float | None = None,
    hook: str | None = None,
    split: str = "train",
    heldout_every: int = DEFAULT_HELDOUT_EVERY,
) -> ActivationSource:
    """`synthetic`, an activation file (.npy / .safetensors), or an hsae store folder (`hook` picks
    one of a store's hooks). `max_norm_ratio` (stores only; None: the store's default of 10, 0: keep
    all rows) leaves rows with a norm above that multiple of the median out of the stream. `split`
    and `heldout_every` choose the training rows, the held-out ones or all (synthetic data holds its
    evaluation sample out by construction)."""
    if max_norm_ratio is not None and (data == "synthetic" or Path(data).is_file()):
        raise HsaeError("--max-norm-ratio applies to hsae stores only (harvest one with `hsae harvest`)")
    if hook is not None and (data == "synthetic" or Path(data).is_file()):
        raise HsaeError(f"--hook {hook} selects a hook of an hsae store; --data {data} is not one")
    if data == "synthetic":
        from hsae.config import from_dict
        from hsae.sources.synthetic import SyntheticConfig, SyntheticSource

        options = dict(synthetic or {})
        options.setdefault("seed", str(seed))
        return SyntheticSource(from_dict(SyntheticConfig, options, what="--synthetic"))
    if synthetic:
        raise HsaeError("--synthetic options only apply with --data synthetic")
    path = Path(data)
    if path.is_dir():
        if (path / "manifest.json").is_file():
            from hsae.store import DEFAULT_MAX_NORM_RATIO, ActivationStore

            ratio = DEFAULT_MAX_NORM_RATIO if max_norm_ratio is None else max_norm_ratio
            return ActivationStore.open(
                path, hook=hook, seed=seed, max_norm_ratio=ratio, split=split, heldout_every=heldout_every
            )
        raise HsaeError(
            f"--data {path} is a folder but not an hsae store (no manifest.json); make one with `hsae harvest`"
        )
    from hsae.sources.files import ArrayActivations

    return ArrayActivations.from_file(path, seed=seed, split=split, heldout_every=heldout_every)


__all__ = ["ActivationSource", "open_source", "open_model_source"]
