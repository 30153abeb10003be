"""The activation store: activations harvested once, on disk, read by many training runs.

A store is a folder:

    manifest.json              what was harvested (model, hooks, dtype, widths, corpus, settings),
                               the shards with their row counts and sha256, and where to resume
    shard-00000.safetensors    "activations/<hook>" (rows, width) in the store's dtype, and for the
    shard-00001.safetensors    same rows "token_ids", "doc_ids", "positions" (int64)
    ...

Writing lives with harvesting (`hsae.sources.harvest.harvest_to_store`); this module reads.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from hsae.errors import HsaeError, os_error
from hsae.sources.hf import TokenRows
from hsae.sources.stream import (
    DEFAULT_HELDOUT_EVERY,
    check_batch_request,
    check_split,
    endless_rows,
    in_split,
    rebatch,
    window_permutation,
)

MANIFEST = "manifest.json"
FORMAT = "hsae-activation-store"
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SHARD_ROWS = 65536
DEFAULT_BUFFER_ROWS = 262144
DEFAULT_MAX_NORM_RATIO = 10.0
ROW_FIELDS = ("token_ids", "doc_ids", "positions")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def activation_key(hook: str) -> str:
    return f"activations/{hook}"


def sha256_of(path: Path) -> str:
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
    """The manifest of a store folder, None when it has none; HsaeError if it is not a store's, or
    is damaged (see `check_manifest`)."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HsaeError(f"{file} is not valid JSON ({err}); the store is damaged: harvest it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise HsaeError(f"{path} holds a manifest.json that is not an hsae activation store's")
    check_manifest(manifest, Path(path))
    return manifest


def _is_count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_manifest(manifest: dict[str, Any], folder: Path) -> None:
    """Refuse a manifest hsae could not have written: every field a reader or a resumed harvest uses
    is there with its type, the row counts add up, and every shard is a file inside `folder` (a
    manifest naming `../other/shard` or `/etc/passwd` is refused before anything is opened)."""
    where = folder / MANIFEST

    def damaged(what: str) -> HsaeError:
        return HsaeError(f"{where}: {what}; the store is damaged: harvest it again into a new folder")

    if manifest.get("version") != FORMAT_VERSION:
        raise HsaeError(
            f"{folder}: store format version {manifest.get('version')!r} is not supported (this hsae reads version "
            f"{FORMAT_VERSION}); harvest the store again"
        )
    status = manifest.get("status")
    if status not in ("harvesting", "complete"):
        raise damaged(f"status is {status!r}, not 'harvesting' or 'complete'")
    hooks = manifest.get("hooks")
    if not isinstance(hooks, list) or not hooks:
        raise damaged(f"'hooks' is {hooks!r}, not a list of the harvested hooks")
    for hook in hooks:
        if not (isinstance(hook, dict) and isinstance(hook.get("name"), str) and hook["name"]):
            raise damaged(f"the hook entry {hook!r} has no name")
        if not _is_count(hook.get("d_in"), 1):
            raise damaged(f"hook {hook['name']!r} has width {hook.get('d_in')!r}, not a positive integer")
        if "transformer_lens" not in hook or not isinstance(hook["transformer_lens"], (str, type(None))):
            raise damaged(f"hook {hook['name']!r} has no transformer_lens name (a string, or null)")
    if len({h["name"] for h in hooks}) != len(hooks):
        raise damaged("a hook is listed twice")
    if not isinstance(manifest.get("dtype"), str) or manifest["dtype"] not in DTYPES:
        raise damaged(f"dtype is {manifest.get('dtype')!r}, not one of {', '.join(DTYPES)}")
    if not isinstance(manifest.get("model"), dict):
        raise damaged("'model' does not describe the harvested model")
    for key in ("corpus", "harvest"):
        if key not in manifest:
            raise damaged(f"it does not record the {key} settings")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise damaged(f"'shards' is {shards!r}, not a list of shard files")
    if status == "complete" and not shards:
        raise damaged("it is marked complete but lists no shards")
    root = folder.resolve()
    for shard in shards:
        if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and shard["file"]):
            raise damaged(f"the shard entry {shard!r} names no file")
        name = shard["file"]
        try:
            target = (folder / name).resolve()
        except (ValueError, OSError):  # a NUL byte, a loop of links
            raise damaged(f"the shard name {name!r} is not a path") from None
        if target == root or not target.is_relative_to(root):
            raise HsaeError(
                f"{where}: shard {name!r} is outside the store folder ({target}); a store reads only files inside "
                "its own folder: the manifest is damaged or was edited, harvest the store again"
            )
        if not _is_count(shard.get("rows"), 1):
            raise damaged(f"shard {name!r} has {shard.get('rows')!r} rows, not a positive integer")
        sha = shard.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise damaged(f"shard {name!r} has no sha256 checksum")
    if len({s["file"] for s in shards}) != len(shards):
        raise damaged("a shard file is listed twice")
    total = manifest.get("total_rows")
    if not _is_count(total) or total != sum(s["rows"] for s in shards):
        raise damaged(f"total_rows {total!r} is not the sum of the shards' rows ({sum(s['rows'] for s in shards)})")
    if not _is_count(manifest.get("target_rows"), 1):
        raise damaged(f"target_rows is {manifest.get('target_rows')!r}, not a positive integer")
    resume = manifest.get("resume")
    if status == "harvesting" and not (
        isinstance(resume, dict) and _is_count(resume.get("document")) and _is_count(resume.get("rows_into_window"))
    ):
        raise damaged(f"the store is unfinished but its resume point is {resume!r}")


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
        split: str = "all",
        heldout_every: int = DEFAULT_HELDOUT_EVERY,
    ):
        self.path = path
        self.max_norm_ratio = max_norm_ratio
        self.split = split
        self.heldout_every = heldout_every
        self._split_rows: dict[int, int] = {}  # shard index -> rows of the split
        self._norm_limit: float | None = None
        self._kept: dict[int, int] = {}  # shard index -> rows within the norm limit
        self.manifest = manifest
        self.hook = hook
        self.seed = seed
        self.buffer_rows = buffer_rows
        self.shards = [ShardInfo(i, s["file"], s["rows"], s["sha256"]) for i, s in enumerate(manifest["shards"])]
        self.d_in: int = next(h["d_in"] for h in manifest["hooks"] if h["name"] == hook)
        self._verified: set[int] = set()
        self._tokenizer: Any = None

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        hook: str | None = None,
        seed: int = 0,
        buffer_rows: int = DEFAULT_BUFFER_ROWS,
        max_norm_ratio: float | None = DEFAULT_MAX_NORM_RATIO,
        split: str = "all",
        heldout_every: int = DEFAULT_HELDOUT_EVERY,
    ) -> ActivationStore:
        """Open a complete store; `hook` picks one when it holds several. Rows with a norm above
        `max_norm_ratio` times the median are left out of batches (None or 0: keep all). `split`
        reads everything ("all", the default here), the training rows ("train": what `hsae train`
        reads) or the held-out documents (every `heldout_every`-th: "heldout", what `hsae eval` reads)."""
        check_split(split, heldout_every)
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
        if manifest["status"] != "complete":
            raise HsaeError(
                f"store {path} is incomplete ({manifest['total_rows']} of {manifest['target_rows']} rows): "
                "run the same `hsae harvest` command again to finish it"
            )
        names = [h["name"] for h in manifest["hooks"]]
        if hook is None:
            if len(names) > 1:
                raise HsaeError(f"store {path} holds several hooks ({', '.join(names)}): choose one with --hook")
            hook = names[0]
        by_lens = {h.get("transformer_lens"): h["name"] for h in manifest["hooks"] if h.get("transformer_lens")}
        hook = by_lens.get(hook, hook)  # a TransformerLens name selects its module's hook
        if hook not in names:
            raise HsaeError(f"store {path} has no hook {hook!r} (it holds {', '.join(names)})")
        return cls(path, manifest, hook, seed, buffer_rows, max_norm_ratio or None, split, heldout_every)

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
            "split": self.split,
            "heldout_every": self.heldout_every,
        }

    def epoch_rows(self) -> int:
        """Rows of this split (before the norm limit): what one pass over the data reads."""
        return sum(self._split_count(s) for s in self.shards)

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
            try:
                if not file.is_file():
                    raise HsaeError(f"store {self.path}: shard {shard.file} is missing; harvest the store again")
                checksum = sha256_of(file)
            except OSError as err:  # unreadable, a name too long, ...
                raise os_error(err, file, action="cannot read") from None
            if checksum != shard.sha256:
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
                    tensors.update({name: fh.get_tensor(name) for name in ROW_FIELDS})
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise HsaeError(f"store {self.path}: cannot read shard {shard.file} ({err})") from None
        if tensors["activations"].shape != (shard.rows, self.d_in):
            raise HsaeError(f"store {self.path}: shard {shard.file} has shape {tuple(tensors['activations'].shape)}")
        return tensors

    def iter_shards(self) -> Iterator[dict[str, Tensor]]:
        """Every shard in harvest order with its token ids, doc ids and positions (for interpretation)."""
        for shard in self.shards:
            yield self.read_shard(shard.index)

    def rows(self) -> Iterator[TokenRows]:
        """Every row in harvest order, a shard at a time, as TokenRows: this hook's activations with
        each row's token id, document number and position (whatever the split: for finding where a
        feature fires). `text` turns token ids back into text."""
        for tensors in self.iter_shards():
            yield TokenRows(
                {self.hook: tensors["activations"]}, tensors["token_ids"], tensors["doc_ids"], tensors["positions"]
            )

    def tokenizer(self) -> Any:
        """The tokenizer of the model the store was harvested from (its folder, or the hub cache)."""
        from transformers import AutoTokenizer

        model = self.manifest["model"]
        source = model.get("path") or model.get("name")
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise HsaeError(f"store {self.path}: cannot load the tokenizer of {source} ({err})") from None

    def text(self, token_ids: Tensor | list[int]) -> list[str]:
        """Each token id as the text it stands for."""
        tokenizer = self.tokenizer() if self._tokenizer is None else self._tokenizer
        self._tokenizer = tokenizer
        return tokenizer.convert_ids_to_tokens([int(t) for t in token_ids])

    # -- the ActivationSource protocol ---------------------------------------------------------

    def _rank_shards(self, rank: int, world_size: int) -> list[ShardInfo]:
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

    def _rows_of_split(self, shard: ShardInfo) -> Tensor:
        """A shard's activation rows that belong to this reader's split, in harvest order."""
        if self.split == "all" or self.heldout_every == 0:
            return self.read_shard(shard.index, all_fields=False)["activations"]
        tensors = self.read_shard(shard.index)
        keep = in_split(tensors["doc_ids"], self.split, self.heldout_every)
        self._split_rows[shard.index] = int(keep.sum())
        return tensors["activations"][keep]

    def _split_count(self, shard: ShardInfo) -> int:
        if self.split == "all" or self.heldout_every == 0:
            return shard.rows
        if shard.index not in self._split_rows:
            with safe_open(str(self._verify(shard)), framework="pt") as fh:
                doc_ids = fh.get_tensor("doc_ids")
            self._split_rows[shard.index] = int(in_split(doc_ids, self.split, self.heldout_every).sum())
        return self._split_rows[shard.index]

    def _window_rows(self, epoch: int, index: int, window: list[ShardInfo]) -> Tensor:
        rows = torch.cat([self._rows_of_split(s) for s in window])
        rows = rows[window_permutation(self.seed, epoch, index, len(rows))]
        limit = self.norm_limit()
        if limit is not None:
            rows = rows[rows.norm(dim=1) <= limit]
        return rows

    def _kept_rows(self, shard: ShardInfo) -> int:
        """Rows of a shard that pass the norm limit (all of them without one)."""
        limit = self.norm_limit()
        if limit is None:
            return self._split_count(shard)
        if shard.index not in self._kept:
            acts = self._rows_of_split(shard)
            self._kept[shard.index] = int((acts.norm(dim=1) <= limit).sum())
        return self._kept[shard.index]

    def _epoch_length(self, shards: list[ShardInfo]) -> int:
        """Rows per epoch: those within the norm limit (the shards are read once to count them)."""
        rows = sum(self._kept_rows(s) for s in shards)
        if rows == 0:
            raise HsaeError(f"store {self.path}: no row passes the norm limit {self.norm_limit()}")
        return rows

    def _rows_from(self, shards: list[ShardInfo], epoch: int, row: int) -> Iterator[Tensor]:
        """Shuffled row blocks of one epoch from its row `row` on (earlier windows are not read;
        with a norm limit rows count after it)."""
        offset = row
        for index, window in enumerate(self._epoch_windows(epoch, shards)):
            if offset:
                window_rows = sum(self._kept_rows(s) for s in window)
                if offset >= window_rows:
                    offset -= window_rows
                    continue
            yield self._window_rows(epoch, index, window)[offset:]
            offset = 0

    def batches(self, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[Tensor]:
        """Shuffled float32 batches (batch_size, d_in), endless, starting at batch `start_step`."""
        check_batch_request(batch_size, rank, world_size)
        shards = self._rank_shards(rank, world_size)
        rows = endless_rows(
            lambda: self._epoch_length(shards),
            lambda epoch, row: self._rows_from(shards, epoch, row),
            start_step * batch_size,
            f"{self.split} split of store {self.path} (held out: every {self.heldout_every}th document)",
        )
        return rebatch(rows, batch_size)

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
