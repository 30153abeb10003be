"""The activation store: activations harvested once, on disk, read by many training runs.

A store is a folder:

    manifest.json              what was harvested (model, hooks, dtype, widths, corpus, settings),
                               the shards with their row counts and sha256, and where to resume
    shard-00000.safetensors    "activations/<hook>" (rows, width) in the store's dtype, and for the
    shard-00001.safetensors    same rows "token_ids", "doc_ids", "positions" (int64)
    ...

Writing (`harvest_to_store`): every shard is written atomically, then the manifest is rewritten
atomically with the new shard and the resume point (the place of the first unwritten row: the first
document of its sort window and the rows of that window before it). A harvest stopped at any moment
and started again with the same settings ends with exactly the rows an uninterrupted one has, because
the harvester's batches depend only on the sort window's documents (see `hsae.sources.hf.Harvester`).

Reading (`ActivationStore.open`): shards are memory-mapped (safetensors `safe_open`) and verified
against their checksum when first read. The stream of an epoch is a seeded permutation of the reader's
shards, cut into windows of a few shards (the bounded buffer, `buffer_rows`), each window's rows
permuted with a seed of (seed, epoch, window); batch s is rows [s*B, (s+1)*B) of the endless stream,
so `batches(B, start_step=s)` starts at batch s without replaying. Rank r of w reads shards r, r+w, ...

Norm outliers: rows whose norm exceeds `max_norm_ratio` (default 10) times the median row norm of the
store's first shard are left out of the training stream (and of `sample`), as the first positions of
many causal LMs carry huge, meaningless activations even when special tokens are dropped. The rule
is applied to each window after its permutation, so the stream stays a pure function of the seed and
resuming counts kept rows; `iter_shards` (interpretation, aligned with token ids) keeps every row.
`max_norm_ratio=None` keeps all rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from hsae.atomic import write_json, write_safetensors
from hsae.errors import HsaeError

if TYPE_CHECKING:
    from hsae.sources.hf import Harvester, TokenRows

MANIFEST = "manifest.json"
FORMAT = "hsae-activation-store"
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SHARD_ROWS = 65536
DEFAULT_BUFFER_ROWS = 262144
DEFAULT_MAX_NORM_RATIO = 10.0
_ROW_FIELDS = ("token_ids", "doc_ids", "positions")
# Manifest entries that must match when a harvest is started again on a partial store.
_SETTINGS = ("model", "hooks", "dtype", "corpus", "harvest", "shard_rows", "target_rows")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def activation_key(hook: str) -> str:
    return f"activations/{hook}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise HsaeError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of a store folder, None when it has none; HsaeError if it is not a store's."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise HsaeError(f"{file} is not valid JSON ({err.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise HsaeError(f"{path} holds a manifest.json that is not an hsae activation store's")
    return manifest


# --- shuffling, shared with the on-the-fly source ------------------------------------------------


def window_permutation(seed: int, epoch: int, window: int, n: int) -> Tensor:
    """The seeded order of the rows of one shuffle window."""
    return torch.from_numpy(np.random.default_rng([seed, epoch, window]).permutation(n))


def rebatch(blocks: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Cut a stream of row blocks into batches of exactly `batch_size` rows (a short tail is dropped)."""
    carry: list[Tensor] = []
    carried = 0
    for block in blocks:
        while len(block):
            take = min(batch_size - carried, len(block))
            carry.append(block[:take])
            carried += take
            block = block[take:]
            if carried == batch_size:
                yield torch.cat(carry) if len(carry) > 1 else carry[0]
                carry, carried = [], 0


# --- writing ----------------------------------------------------------------------------------


def check_store_folder(out: Path) -> dict[str, Any] | None:
    """The manifest of a store to resume, None for a new store; refuses folders holding anything else."""
    if out.exists() and not out.is_dir():
        raise HsaeError(f"{out} is a file, not a store folder")
    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is None and out.is_dir():
        others = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        if others:
            raise HsaeError(f"{out} is not empty and is not an activation store: choose a new --out folder")
    return manifest


def harvest_to_store(
    out: str | Path,
    harvester: Harvester,
    corpus: Any,  # hsae.sources.text.Corpus or any re-iterable of strings
    *,
    tokens: int,
    dtype: str = "float32",
    shard_rows: int = DEFAULT_SHARD_ROWS,
    progress: Callable[[int, int], None] | None = None,
) -> ActivationStore:
    """Harvest `tokens` rows (fewer if the corpus ends first) into the store folder `out`.

    Starting again on a partial store with the same settings resumes it; a complete one is returned
    as it is. `progress(rows_done, rows_target)` is called after each batch.
    """
    if tokens <= 0:
        raise HsaeError(f"tokens must be positive, got {tokens}")
    if shard_rows <= 0:
        raise HsaeError(f"shard_rows must be positive, got {shard_rows}")
    store_dtype = parse_dtype(dtype)
    out = Path(out)
    from hsae.sources.hf import attention_heads, transformer_lens_name

    widths = harvester.hooked.widths()
    hooks = []
    for h in harvester.hooks:
        entry: dict[str, Any] = {"name": h, "transformer_lens": transformer_lens_name(h), "d_in": widths[h]}
        heads = attention_heads(harvester.loaded, h, widths[h])
        if heads is not None:  # the concatenated heads: per-head analyses view the decoder in blocks
            entry["heads"], entry["d_head"] = heads
        hooks.append(entry)
    settings = {
        "model": harvester.loaded.describe(),
        "hooks": hooks,
        "dtype": dtype,
        "corpus": corpus.describe() if hasattr(corpus, "describe") else {"kind": "texts"},
        "harvest": harvester.describe(),
        "shard_rows": shard_rows,
        "target_rows": tokens,
    }
    manifest = check_store_folder(out)
    if manifest is None:
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "status": "harvesting",
            **settings,
            "d_in": widths[harvester.hooks[0]] if len(harvester.hooks) == 1 else None,
            "total_rows": 0,
            "shards": [],
            "resume": {"document": 0, "rows_into_window": 0},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(out / MANIFEST, manifest)
    else:
        changed = [key for key in _SETTINGS if manifest.get(key) != settings[key]]
        if changed:
            raise HsaeError(
                f"{out} holds a store harvested with other settings ({', '.join(changed)} differ): "
                "repeat the original command to finish it, or choose a new --out folder"
            )
    for stale in out.glob(".shard-*.tmp"):  # temp files of a harvest killed mid-write
        stale.unlink()
    if manifest["status"] == "complete":
        return ActivationStore.open(out, hook=harvester.hooks[0])

    done = manifest["total_rows"]
    # Rows harvested but not yet in a shard, each segment tagged with the place of its first row in
    # the harvest's stream (hsae.sources.hf.RowPlace): what the manifest records to resume from.
    pending: deque[_Segment] = deque()
    pending_rows = 0
    resume_place = (manifest["resume"]["document"], manifest["resume"]["rows_into_window"])
    after_pending = resume_place  # the place of the row after the pending ones

    def write_shard(n: int) -> None:
        nonlocal done, pending_rows
        parts = []
        while n:
            segment = pending.popleft()
            if len(segment.rows) > n:
                parts.append(segment.rows.slice(0, n))
                rest = _Segment((segment.place[0], segment.place[1] + n), segment.rows.slice(n))
                pending.appendleft(rest)
                n = 0
            else:
                parts.append(segment.rows)
                n -= len(segment.rows)
        rows = parts[0].cat(parts) if len(parts) > 1 else parts[0]
        resume = pending[0].place if pending else after_pending
        path = out / shard_name(len(manifest["shards"]))
        tensors = {activation_key(h): rows.activations[h].to(store_dtype) for h in harvester.hooks}
        tensors.update({name: getattr(rows, name).long() for name in _ROW_FIELDS})
        # One metadata key: safetensors writes several in hash order, so equal shards would differ.
        write_safetensors(path, tensors, metadata={"format": FORMAT})
        done += len(rows)
        pending_rows -= len(rows)
        manifest["shards"].append({"file": path.name, "rows": len(rows), "sha256": _sha256(path)})
        manifest["total_rows"] = done
        manifest["resume"] = {"document": resume[0], "rows_into_window": resume[1]}
        write_json(out / MANIFEST, manifest)

    batches = harvester.batches(corpus, resume_place) if done < tokens else iter(())
    for batch in batches:
        rows = batch.rows.slice(0, tokens - done - pending_rows)
        if len(rows):
            pending.append(_Segment(batch.start, rows))
            pending_rows += len(rows)
        after_pending = batch.end
        while pending_rows >= shard_rows:
            write_shard(shard_rows)
        if progress:
            progress(done + pending_rows, tokens)
        if done + pending_rows >= tokens:
            break
    if pending_rows:  # the last, shorter shard
        write_shard(pending_rows)
    if done == 0:
        raise HsaeError("the corpus gave no tokens to harvest (every document is empty or special tokens)")
    manifest["status"] = "complete"
    manifest["resume"] = None
    write_json(out / MANIFEST, manifest)
    return ActivationStore.open(out, hook=harvester.hooks[0])


@dataclass
class _Segment:
    place: tuple[int, int]  # of rows[0]: (first document of its sort window, rows of the window before)
    rows: TokenRows


# --- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    index: int
    file: str
    rows: int
    sha256: str


class ActivationStore:
    """A harvested store, read as an `ActivationSource` for one of its hooks."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        hook: str,
        seed: int,
        buffer_rows: int,
        max_norm_ratio: float | None = DEFAULT_MAX_NORM_RATIO,
    ):
        self.path = path
        self.max_norm_ratio = max_norm_ratio
        self._norm_limit: float | None = None
        self._kept: dict[int, int] = {}  # shard index -> rows within the norm limit
        self.manifest = manifest
        self.hook = hook
        self.seed = seed
        self.buffer_rows = buffer_rows
        self.shards = [ShardInfo(i, s["file"], s["rows"], s["sha256"]) for i, s in enumerate(manifest["shards"])]
        self.d_in: int = next(h["d_in"] for h in manifest["hooks"] if h["name"] == hook)
        self._verified: set[int] = set()

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        hook: str | None = None,
        seed: int = 0,
        buffer_rows: int = DEFAULT_BUFFER_ROWS,
        max_norm_ratio: float | None = DEFAULT_MAX_NORM_RATIO,
    ) -> ActivationStore:
        """Open a complete store; `hook` picks one when it holds several. Rows with a norm above
        `max_norm_ratio` times the median are left out of batches (None or 0: keep all)."""
        if max_norm_ratio is not None and not (max_norm_ratio == 0 or max_norm_ratio >= 1):
            raise HsaeError(
                f"max_norm_ratio must be >= 1 (a multiple of the median row norm) or 0 to keep every row, "
                f"got {max_norm_ratio}"
            )
        path = Path(path)
        if not path.is_dir():
            raise HsaeError(f"activation store {path} does not exist")
        manifest = read_manifest(path)
        if manifest is None:
            raise HsaeError(f"{path} is not an activation store (no {MANIFEST})")
        if manifest.get("version") != FORMAT_VERSION:
            raise HsaeError(f"{path}: store format version {manifest.get('version')} is not supported")
        if manifest["status"] != "complete":
            raise HsaeError(
                f"store {path} is incomplete ({manifest['total_rows']} of {manifest['target_rows']} rows): "
                "run the same `hsae harvest` command again to finish it"
            )
        names = [h["name"] for h in manifest["hooks"]]
        if hook is None:
            if len(names) > 1:
                raise HsaeError(f"store {path} holds several hooks ({', '.join(names)}): choose one")
            hook = names[0]
        if hook not in names:
            raise HsaeError(f"store {path} has no hook {hook!r} (it holds {', '.join(names)})")
        return cls(path, manifest, hook, seed, buffer_rows, max_norm_ratio or None)

    # -- facts ---------------------------------------------------------------------------------

    @property
    def total_rows(self) -> int:
        return int(self.manifest["total_rows"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def hooks(self) -> list[str]:
        return [h["name"] for h in self.manifest["hooks"]]

    def describe(self) -> dict[str, Any]:
        hook = next(h for h in self.manifest["hooks"] if h["name"] == self.hook)
        return {
            "kind": "store",
            "path": str(self.path.resolve()),
            "model": self.manifest["model"],
            "hook": self.hook,
            "hook_transformer_lens": hook["transformer_lens"],
            "d_in": self.d_in,
            "dtype": self.dtype,
            "rows": self.total_rows,
            "corpus": self.manifest["corpus"],
            "harvest": self.manifest["harvest"],
            "seed": self.seed,
            "max_norm_ratio": self.max_norm_ratio,
            "norm_limit": self.norm_limit(),
        }

    def norm_limit(self) -> float | None:
        """Rows with a larger norm are left out of batches: `max_norm_ratio` times the median row
        norm of the first shard (None: no limit)."""
        if self.max_norm_ratio is None:
            return None
        if self._norm_limit is None:
            first = self.read_shard(0, all_fields=False)["activations"]
            self._norm_limit = float(first.norm(dim=1).median()) * self.max_norm_ratio
        return self._norm_limit

    def check_compatible(self, d_in: int | None = None) -> None:
        """Raise HsaeError when a model of width `d_in` cannot train on this store."""
        if d_in is not None and d_in != self.d_in:
            raise HsaeError(
                f"store {self.path} holds {self.hook} activations of width {self.d_in}, "
                f"but the model expects d_in={d_in}"
            )

    # -- shards --------------------------------------------------------------------------------

    def _verify(self, shard: ShardInfo) -> Path:
        file = self.path / shard.file
        if shard.index not in self._verified:
            if not file.is_file():
                raise HsaeError(f"store {self.path}: shard {shard.file} is missing")
            if _sha256(file) != shard.sha256:
                raise HsaeError(
                    f"store {self.path}: shard {shard.file} is corrupted (its sha256 does not match the "
                    "manifest): harvest it again into a new folder"
                )
            self._verified.add(shard.index)
        return file

    def verify(self) -> None:
        """Check every shard's checksum now (reading checks each shard when first used)."""
        for shard in self.shards:
            self._verify(shard)

    def read_shard(self, index: int, *, all_fields: bool = True) -> dict[str, Tensor]:
        """A shard's tensors: "activations" (float32, this store's hook) and, if asked, the row fields."""
        shard = self.shards[index]
        file = self._verify(shard)
        try:
            with safe_open(str(file), framework="pt") as fh:
                tensors = {"activations": fh.get_tensor(activation_key(self.hook)).float()}
                if all_fields:
                    tensors.update({name: fh.get_tensor(name) for name in _ROW_FIELDS})
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise HsaeError(f"store {self.path}: cannot read shard {shard.file} ({err})") from None
        if tensors["activations"].shape != (shard.rows, self.d_in):
            raise HsaeError(f"store {self.path}: shard {shard.file} has shape {tuple(tensors['activations'].shape)}")
        return tensors

    def iter_shards(self) -> Iterator[dict[str, Tensor]]:
        """Every shard in harvest order with its token ids, doc ids and positions (for interpretation)."""
        for shard in self.shards:
            yield self.read_shard(shard.index)

    # -- the ActivationSource protocol ---------------------------------------------------------

    def _rank_shards(self, rank: int, world_size: int) -> list[ShardInfo]:
        if not 0 <= rank < world_size:
            raise HsaeError(f"rank {rank} is not in 0..{world_size - 1}")
        if world_size > len(self.shards):
            raise HsaeError(
                f"store {self.path} has {len(self.shards)} shards, too few for {world_size} ranks: "
                "harvest again with a smaller --shard-rows"
            )
        return self.shards[rank::world_size]

    def _epoch_windows(self, epoch: int, shards: list[ShardInfo]) -> list[list[ShardInfo]]:
        """This epoch's shard order, grouped into windows of about `buffer_rows` rows."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(shards))
        per_window = max(1, self.buffer_rows // max(s.rows for s in shards))
        ordered = [shards[i] for i in order]
        return [ordered[i : i + per_window] for i in range(0, len(ordered), per_window)]

    def _window_rows(self, epoch: int, index: int, window: list[ShardInfo]) -> Tensor:
        rows = torch.cat([self.read_shard(s.index, all_fields=False)["activations"] for s in window])
        rows = rows[window_permutation(self.seed, epoch, index, len(rows))]
        limit = self.norm_limit()
        if limit is not None:
            rows = rows[rows.norm(dim=1) <= limit]
        return rows

    def _kept_rows(self, shard: ShardInfo) -> int:
        """Rows of a shard that pass the norm limit (all of them without one)."""
        limit = self.norm_limit()
        if limit is None:
            return shard.rows
        if shard.index not in self._kept:
            acts = self.read_shard(shard.index, all_fields=False)["activations"]
            self._kept[shard.index] = int((acts.norm(dim=1) <= limit).sum())
        return self._kept[shard.index]

    def _stream(self, shards: list[ShardInfo], start_row: int) -> Iterator[Tensor]:
        """Shuffled row blocks of the endless stream, from row `start_row` (windows before it unread;
        with a norm limit, rows count after it, so the shards before the start are read once to
        count theirs)."""
        epoch, offset = 0, start_row
        if start_row:
            epoch_rows = sum(self._kept_rows(s) for s in shards)
            if epoch_rows == 0:
                raise HsaeError(f"store {self.path}: no row passes the norm limit {self.norm_limit()}")
            epoch, offset = divmod(start_row, epoch_rows)
        while True:
            for index, window in enumerate(self._epoch_windows(epoch, shards)):
                if offset:
                    window_rows = sum(self._kept_rows(s) for s in window)
                    if offset >= window_rows:
                        offset -= window_rows
                        continue
                yield self._window_rows(epoch, index, window)[offset:]
                offset = 0
            epoch += 1

    def batches(self, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[Tensor]:
        """Shuffled float32 batches (batch_size, d_in), endless, starting at batch `start_step`."""
        if batch_size <= 0:
            raise HsaeError(f"batch_size must be positive, got {batch_size}")
        shards = self._rank_shards(rank, world_size)
        return rebatch(self._stream(shards, start_step * batch_size), batch_size)

    def sample(self, n: int) -> Tensor:
        """A fixed sample of up to n rows: the first n of the shuffled stream, never more than one
        epoch (so no row twice, also when the norm limit leaves rows out)."""
        if n <= 0:
            raise HsaeError(f"sample size must be positive, got {n}")
        blocks, have = [], 0
        for index, window in enumerate(self._epoch_windows(0, self.shards)):
            rows = self._window_rows(0, index, window)
            blocks.append(rows[: n - have])
            have += len(blocks[-1])
            if have >= n:
                break
        return torch.cat(blocks)
