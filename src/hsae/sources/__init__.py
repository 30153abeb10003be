"""Where activations come from. `open_source` turns the `--data` argument into an ActivationSource."""

from __future__ import annotations

from pathlib import Path

from hsae.errors import HsaeError
from hsae.sources.base import ActivationSource


def open_model_source(
    model: str | None, hook: str | None, corpus: str, *, seed: int = 0, device: str | None = None
) -> ActivationSource:
    """Activations harvested on the fly from `model` at `hook` on `corpus` (no cache on disk)."""
    from hsae.sources.hf import DEFAULT_HOOK, ModelActivationSource, load_model
    from hsae.sources.text import open_corpus

    documents = open_corpus(corpus)
    return ModelActivationSource(load_model(model, device=device), hook or DEFAULT_HOOK, documents, seed=seed)


def open_source(
    data: str, *, seed: int = 0, synthetic: dict[str, str] | None = None, max_norm_ratio: float | None = None
) -> ActivationSource:
    """`synthetic`, an activation file (.npy / .safetensors), or an hsae store folder.
    `max_norm_ratio` (stores only; None: the store's default of 10, 0: keep all rows) leaves rows
    with a norm above that multiple of the median out of the stream."""
    if max_norm_ratio is not None and (data == "synthetic" or Path(data).is_file()):
        raise HsaeError("--max-norm-ratio applies to hsae stores only (harvest one with `hsae harvest`)")
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
            return ActivationStore.open(path, seed=seed, max_norm_ratio=ratio)
        raise HsaeError(
            f"--data {path} is a folder but not an hsae store (no manifest.json); make one with `hsae harvest`"
        )
    from hsae.sources.files import ArrayActivations

    return ArrayActivations.from_file(path, seed=seed)


__all__ = ["ActivationSource", "open_source", "open_model_source"]
