"""The examples pass: one streaming pass over N tokens that gives every latent what a person needs to
see what it means, written to `DIR/examples.sqlite` (see `examples_db`).

Per latent: the top activating contexts (a window of tokens around the peak with the latent's
activation on every token), examples from activation quantiles (delphi's sampling: a uniform sample of
the latent's firings split into equal-count quantiles, lowest first), its firing density, a histogram
of its activation values, its strongest co-firing latents, the most negative activations too for
signed codes, and, for a causal LM, the tokens its decoder direction promotes and suppresses.

Every row is encoded once; contexts come from the neighbouring rows of the same document (a store
keeps each row's token id, document and position), so no second forward pass is needed. Memory is
bounded by the tables (n_latents x examples x window), whatever N. The pass checkpoints its state
every `checkpoint_seconds` beside the output and resumes from it when run again with the same
settings; the file itself appears only when complete (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from hsae.atomic import write_safetensors
from hsae.errors import HsaeError
from hsae.interpret.collect import ExampleTables, histogram_edges
from hsae.interpret.examples_db import FORMAT, FORMAT_VERSION, examples_path, read_meta, write_examples
from hsae.interpret.rows import RowBlock, codes_to_csr
from hsae.interpret.streams import TokenChunk
from hsae.interpret.tokens import TokenText, normalise
from hsae.interpret.unembed import logit_effects, unembedding


@dataclass
class ExamplesConfig:
    tokens: int = 1_000_000  # rows to stream (fewer if the data ends first)
    top: int = 20  # top activating contexts per latent
    quantiles: int = 10  # activation quantiles ...
    per_quantile: int = 5  # ... and examples from each
    before: int = 10  # context tokens before the example's token
    after: int = 5  # and after it
    cofire: int = 10  # co-firing latents kept per latent
    cofire_width: int = 32  # active latents recorded per sampled token (the first ones: TopK lists the strongest first)
    random_contexts: int = 2048  # uniformly sampled windows (non-activating contexts for the scorers)
    logit_tokens: int = 10  # promoted / suppressed tokens per latent (causal LMs)
    batch_rows: int = 4096  # rows encoded at a time
    chunk_rows: int = 16384  # rows examined at a time
    seed: int = 0
    checkpoint_seconds: float = 120.0

    def validate(self) -> ExamplesConfig:
        positive = (
            "tokens",
            "top",
            "quantiles",
            "per_quantile",
            "cofire_width",
            "random_contexts",
            "batch_rows",
            "chunk_rows",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise HsaeError(f"examples: {name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("before", "after", "cofire", "logit_tokens"):
            if getattr(self, name) < 0:
                raise HsaeError(f"examples: {name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        return self

    def identity(self) -> dict[str, Any]:
        """The settings the result depends on (not how often it checkpoints)."""
        return {k: v for k, v in asdict(self).items() if k != "checkpoint_seconds"}


@dataclass
class ExamplesRun:
    path: Path
    rows: int
    seconds: float
    reused: bool = False  # an up-to-date file was already there
    resumed_at: int = 0  # rows a checkpoint had already done


def model_fingerprint(sae) -> str:
    """Identifies the weights the examples were computed with (not a forest saved later)."""
    digest = hashlib.sha256(json.dumps([sae.arch, sae.n_latents, sae.d_in]).encode())
    for tensor in (sae.W_enc, sae.W_dec, sae.b_dec):
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_chunk(sae, chunk: TokenChunk, first_row: int, batch_rows: int) -> RowBlock:
    device = sae.W_dec.device
    offsets, latents, values = [torch.zeros(1, dtype=torch.long)], [], []
    for start in range(0, chunk.activations.shape[0], batch_rows):
        off, lat, val = codes_to_csr(sae.encode(chunk.activations[start : start + batch_rows].to(device)))
        offsets.append(off[1:] + offsets[-1][-1])
        latents.append(lat)
        values.append(val)
    m = chunk.activations.shape[0]
    return RowBlock(
        torch.arange(first_row, first_row + m),
        chunk.token_ids.long(),
        chunk.doc_ids.long(),
        chunk.positions.long(),
        torch.cat(offsets),
        torch.cat(latents) if latents else torch.zeros(0, dtype=torch.long),
        torch.cat(values) if values else torch.zeros(0),
    )


class ExamplesPass:
    """Feeds encoded rows to the tables `chunk_rows` at a time (the tables' per-batch work, a few
    passes over n_latents x capacity, is amortised over them), holding back the last `after` rows
    until their right context has come and keeping `before` rows of left context."""

    def __init__(self, sae, config: ExamplesConfig):
        self.sae, self.cfg = sae, config
        self.tables = ExampleTables(
            sae.n_latents,
            top=config.top,
            sample=config.quantiles * config.per_quantile,
            before=config.before,
            after=config.after,
            cofire_width=config.cofire_width,
            contexts=config.random_contexts,
            seed=config.seed,
        )
        self.left = RowBlock.empty()
        self.pending: list[RowBlock] = []  # encoded rows not examined yet
        self.pending_rows = 0
        self.rows_read = 0

    def feed(self, chunk: TokenChunk) -> None:
        if chunk.activations.shape[1] != self.sae.d_in:
            raise HsaeError(
                f"the data has width {chunk.activations.shape[1]} but the model takes {self.sae.d_in}: "
                "give the store or hook it was trained on"
            )
        block = encode_chunk(self.sae, chunk, self.rows_read, self.cfg.batch_rows)
        self.rows_read += len(block)
        self.pending.append(block)
        self.pending_rows += len(block)
        if self.pending_rows >= self.cfg.chunk_rows + self.cfg.after:
            self._examine(final=False)

    def finish(self) -> None:
        self._examine(final=True)

    def _examine(self, final: bool) -> None:
        buffer = RowBlock.cat([self.left, *self.pending])
        lo = len(self.left)
        hi = len(buffer) if final else max(lo, len(buffer) - self.cfg.after)
        self.tables.add(buffer, lo, hi)
        self.left = buffer.slice(max(0, hi - self.cfg.before), hi)
        rest = buffer.slice(hi, len(buffer))
        self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)

    def tensors(self) -> dict[str, Tensor]:
        out = self.tables.tensors()
        out.update(self.left.tensors("left"))
        out.update((RowBlock.cat(self.pending) if self.pending else RowBlock.empty()).tensors("pending"))
        out["rows_read"] = torch.tensor(self.rows_read)
        return out

    def load(self, tensors: dict[str, Tensor]) -> None:
        self.tables.load(tensors)
        self.left = RowBlock.from_tensors(tensors, "left")
        pending = RowBlock.from_tensors(tensors, "pending")
        self.pending, self.pending_rows = ([pending] if len(pending) else []), len(pending)
        self.rows_read = int(tensors["rows_read"])


# --- the finished tables, as rows of the examples file ------------------------------------------


def _example_rows(table, kind: str, quantiles: int | None = None) -> Iterator[tuple]:
    """The examples table's rows for one table, latent by latent (made as they are written)."""
    latents, slots = table.filled()
    p = {name: value[latents, slots] for name, value in table.payload.items()}
    if quantiles is not None:  # by activation within each latent, lowest first (else by key, largest first)
        order = torch.argsort(p["value"], stable=True)
        order = order[torch.argsort(latents[order], stable=True)]
        latents = latents[order]
        p = {name: value[order] for name, value in p.items()}
    counts = torch.bincount(latents, minlength=table.n_latents)
    rank = torch.arange(latents.numel()) - (counts.cumsum(0) - counts)[latents]
    quantile = (rank * quantiles // counts[latents]).tolist() if quantiles else [None] * latents.numel()
    tokens = np.ascontiguousarray(p["tokens"].numpy().astype("<i4"))
    acts = np.ascontiguousarray(p["acts"].numpy().astype("<f4"))
    columns = zip(
        latents.tolist(),
        rank.tolist(),
        quantile,
        p["value"].tolist(),
        p["row"].tolist(),
        p["doc"].tolist(),
        p["position"].tolist(),
        strict=True,
    )
    for i, (lat, r, q, v, row, doc, pos) in enumerate(columns):
        yield lat, kind, r, q, v, row, doc, pos, tokens[i].tobytes(), acts[i].tobytes()


def cofiring(tables: ExampleTables, top: int, block: int = 1024) -> list[list[list[float]]]:
    """Per latent, up to `top` [latent j, P(j on | i on), lift P(j | i) / P(j)], ranked by how much more
    often j fires with i than overall, from i's uniformly sampled firings (j seen at least twice).
    Counted as sparse (i, j) pairs, `block` latents at a time."""
    n = tables.n_latents
    coactive, filled = tables.sample.payload["coactive"], tables.sample.keys > -torch.inf
    density = tables.fires.double() / max(tables.rows_seen, 1)
    samples = filled.sum(1).clamp_min(1).double()
    out: list[list[list[float]]] = [[] for _ in range(n)]
    for start in range(0, n, block):
        co = coactive[start : start + block].long()
        owner = torch.arange(start, start + co.shape[0])[:, None, None].expand_as(co)
        ok = (co >= 0) & filled[start : start + block, :, None] & (co != owner)
        pairs, counts = torch.unique(owner[ok] * n + co[ok], return_counts=True)
        pairs, counts = pairs[counts >= 2], counts[counts >= 2]
        i, j = pairs // n, pairs % n
        share = counts.double() / samples[i]
        excess = share - density[j]
        # by latent, largest excess first; keep `top` of each
        order = torch.argsort(excess, descending=True, stable=True)
        order = order[torch.argsort(i[order], stable=True)]
        i, j, share = i[order], j[order], share[order]
        first = torch.searchsorted(i, i)  # index of each latent's first pair
        keep = (torch.arange(i.numel()) - first) < top
        i, j, share = i[keep], j[keep], share[keep]
        lift = share / density[j].clamp_min(1e-12)
        for a, b, s, f in zip(i.tolist(), j.tolist(), share.tolist(), lift.tolist(), strict=True):
            out[a].append([b, round(s, 4), round(f, 2)])
    return out


def _token_index(table, pieces: dict[int, str]) -> list[tuple]:
    """(token, latent, times) for the tokens each latent is active on in its top examples."""
    n = table.n_latents
    held = (table.keys > -torch.inf)[:, :, None]
    tokens = table.payload["tokens"].long()
    ok = (table.payload["acts"] != 0) & (tokens >= 0) & held
    latents = torch.arange(n)[:, None, None].expand_as(tokens)[ok]
    pairs, times = torch.unique(tokens[ok] * n + latents, return_counts=True)
    counts: dict[tuple[str, int], int] = {}
    keys = {t: normalise(pieces.get(t, "")) for t in (pairs // n).unique().tolist()}
    for pair, m in zip(pairs.tolist(), times.tolist(), strict=True):
        key = (keys[pair // n], pair % n)
        if key[0]:
            counts[key] = counts.get(key, 0) + m
    return [(token, latent, m) for (token, latent), m in counts.items()]


def write_result(
    path: Path, run: ExamplesPass, meta: dict[str, Any], loaded, label_names: list[str] | None = None
) -> None:
    """Write the examples file. Token ids read as the text model's tokens (`loaded`'s tokenizer), or
    for an image store as its label names (`label_names`; no model needed then)."""
    tables, cfg = run.tables, run.cfg
    n = tables.n_latents
    examples = itertools.chain(
        _example_rows(tables.top, "top"),
        _example_rows(tables.bottom, "bottom") if tables.bottom is not None else (),
        _example_rows(tables.sample, "quantile", quantiles=cfg.quantiles),
    )
    latents, slots = tables.contexts.filled()
    context_tokens = tables.contexts.payload["tokens"][latents, slots].numpy().astype("<i4")
    context_active = tables.contexts.payload["active"][latents, slots].numpy().astype("<i4")
    contexts = [
        (i, row, context_tokens[i].tobytes(), context_active[i].tobytes())
        for i, row in enumerate(tables.contexts.payload["row"][latents, slots].tolist())
    ]

    shown = [table.payload["tokens"].reshape(-1) for table in tables.tables().values()]
    seen = set(torch.cat([tables.token_counts.nonzero().squeeze(1), *shown]).unique().tolist())
    seen.discard(-1)
    counts = tables.token_counts.tolist()
    if label_names is not None:
        pieces = {t: label_names[t] if 0 <= t < len(label_names) else f"label {t}" for t in seen}
    else:
        pieces = TokenText(loaded.tokenizer).pieces(seen)
    vocab = [(t, pieces[t], counts[t] if t < len(counts) else 0) for t in sorted(seen)]

    effects = None
    w_u = unembedding(loaded, run.sae.d_in) if cfg.logit_tokens and loaded is not None else None
    if w_u is not None:
        effects = [e.tolist() for e in logit_effects(run.sae.W_dec.detach(), w_u, cfg.logit_tokens)]
        meta["logit_lens"] = True
    firing = tables.fires.tolist()
    density = (tables.fires.double() / max(tables.rows_seen, 1)).tolist()
    max_act = torch.full((n,), float("nan"))
    lat, slots = tables.top.filled()
    max_act.scatter_reduce_(0, lat, tables.top.keys[lat, slots], "amax", include_self=False)
    min_act = torch.full((n,), float("nan"))
    if tables.bottom is not None:
        lat, slots = tables.bottom.filled()
        min_act.scatter_reduce_(0, lat, -tables.bottom.keys[lat, slots], "amin", include_self=False)
    cofire = cofiring(tables, cfg.cofire)
    hist = tables.hist.tolist()

    def as_pairs(ids: list[list[int]], by: list[list[float]]) -> list[str]:
        return [json.dumps([[t, round(v, 4)] for t, v in zip(i, b, strict=True)]) for i, b in zip(ids, by, strict=True)]

    promoted = as_pairs(effects[0], effects[1]) if effects else [None] * n
    suppressed = as_pairs(effects[2], effects[3]) if effects else [None] * n
    features = [
        (
            i,
            firing[i],
            density[i],
            None if max_act[i].isnan() else float(max_act[i]),
            None if min_act[i].isnan() else float(min_act[i]),
            json.dumps(hist[i]),
            json.dumps(cofire[i]),
            promoted[i],
            suppressed[i],
        )
        for i in range(n)
    ]
    meta.update(
        rows=tables.rows_seen,
        histogram_edges=histogram_edges(),
        window={"before": cfg.before, "after": cfg.after},
    )
    write_examples(path, meta, features, examples, contexts, vocab, _token_index(tables.top, pieces))


# --- the command's work -----------------------------------------------------------------------


def _read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["state"])
            return {key: fh.get_tensor(key) for key in fh.keys()}, meta
    except Exception:  # a damaged checkpoint is only lost work: start again
        return None


def examples_identity(sae, stream, config: ExamplesConfig) -> dict[str, Any]:
    """What an examples file is a function of: the settings, the data and the model's weights."""
    return {"config": config.identity(), "data": stream.describe(), "model": model_fingerprint(sae)}


def up_to_date(path: Path, identity: dict[str, Any]) -> ExamplesRun | None:
    """The run that wrote `path`, if it was made with exactly this identity."""
    existing = read_meta(path)
    if existing is None or existing.get("identity") != identity:
        return None
    return ExamplesRun(path, int(existing.get("rows", 0)), 0.0, reused=True)


def build_examples(
    sae,
    model_dir: str | Path,
    stream,
    config: ExamplesConfig | None = None,
    *,
    out: str | Path | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExamplesRun:
    """Run the examples pass of `sae` over `stream` (`hsae.interpret.streams`) into `out` (default
    DIR/examples.sqlite). An up-to-date file is kept (unless `force`); a checkpoint of the same
    settings is resumed."""
    cfg = (config or ExamplesConfig()).validate()
    path = Path(out) if out is not None else examples_path(model_dir)
    identity = examples_identity(sae, stream, cfg)
    if not force:
        kept = up_to_date(path, identity)
        if kept is not None:
            return kept
    checkpoint = path.with_name(path.name + ".partial")
    run = ExamplesPass(sae, cfg)
    place: Any = None
    saved = _read_checkpoint(checkpoint)
    if saved is not None and saved[1].get("identity") == identity:
        run.load(saved[0])
        place = saved[1]["place"]
    resumed_at = run.rows_read
    limit = cfg.tokens if stream.total_rows is None else min(cfg.tokens, stream.total_rows)
    t0 = last_save = time.monotonic()
    if progress is not None:
        progress(run.rows_read, limit)
    for chunk in stream.chunks(place) if run.rows_read < limit else ():
        take = limit - run.rows_read
        if chunk.activations.shape[0] > take:
            chunk = TokenChunk(
                chunk.activations[:take], chunk.token_ids[:take], chunk.doc_ids[:take], chunk.positions[:take], None
            )
        run.feed(chunk)
        place = chunk.place
        if progress is not None:
            progress(run.rows_read, limit)
        if run.rows_read >= limit:
            break
        if time.monotonic() - last_save >= cfg.checkpoint_seconds:
            write_safetensors(
                checkpoint, run.tensors(), metadata={"state": json.dumps({"identity": identity, "place": place})}
            )
            last_save = time.monotonic()
    if run.rows_read == 0:
        raise HsaeError("the examples pass found no rows: the data is empty")
    run.finish()
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "identity": identity,
        "n_latents": sae.n_latents,
        "arch": sae.arch,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    labels = stream.label_names()
    write_result(path, run, meta, stream.load_model() if labels is None else None, labels)
    checkpoint.unlink(missing_ok=True)
    return ExamplesRun(path, run.rows_read, time.monotonic() - t0, resumed_at=resumed_at)
