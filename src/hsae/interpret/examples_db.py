"""The examples file: one SQLite database beside the model (`DIR/examples.sqlite`), indexed by latent.

Tables
- meta(key, value)               JSON values: format, identity (config, data, model fingerprint), totals,
                                 histogram edges, window layout
- features(id, ...)              firing count and density, extreme activations, histogram counts,
                                 co-firing latents, promoted/suppressed tokens (causal LMs), as JSON
- examples(latent, kind, rank)   kind 'top' | 'bottom' (signed codes) | 'quantile'; each a window of
                                 token ids (int32) with the latent's activation on each (float32), as blobs
- contexts(id, ...)              uniformly sampled windows with every latent active anywhere in them
- vocab(id, text, count)         how each token reads, and how often it occurs (base rates)
- token_index(token, latent, n)  the tokens each latent fires on in its top examples (search)

Written once, into a temporary file renamed into place (`hsae.atomic`); read through read-only
connections, one per thread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hsae.atomic import atomic_path
from hsae.errors import HsaeError

EXAMPLES_FILE = "examples.sqlite"
FORMAT = "hsae-examples"
FORMAT_VERSION = 1

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE features (
    id INTEGER PRIMARY KEY, fires INTEGER NOT NULL, density REAL NOT NULL, max_act REAL, min_act REAL,
    hist TEXT NOT NULL, cofire TEXT NOT NULL, promoted TEXT, suppressed TEXT
);
CREATE TABLE examples (
    latent INTEGER NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL, quantile INTEGER,
    value REAL NOT NULL, row INTEGER NOT NULL, doc INTEGER NOT NULL, position INTEGER NOT NULL,
    tokens BLOB NOT NULL, acts BLOB NOT NULL,
    PRIMARY KEY (latent, kind, rank)
) WITHOUT ROWID;
CREATE TABLE contexts (id INTEGER PRIMARY KEY, row INTEGER NOT NULL, tokens BLOB NOT NULL, active BLOB NOT NULL);
CREATE TABLE vocab (id INTEGER PRIMARY KEY, text TEXT NOT NULL, count INTEGER NOT NULL);
CREATE TABLE token_index (token TEXT NOT NULL, latent INTEGER NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (token, latent)) WITHOUT ROWID;
"""


def examples_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / EXAMPLES_FILE


# --- writing ----------------------------------------------------------------------------------


def write_examples(
    path: Path,
    meta: dict[str, Any],
    features: Iterable[tuple],
    examples: Iterable[tuple],
    contexts: Iterable[tuple],
    vocab: Iterable[tuple],
    token_index: Iterable[tuple],
) -> None:
    """Write the whole file at once (rows as the tables' columns, in order), atomically."""
    with atomic_path(path) as tmp:
        tmp.unlink()  # sqlite creates its own file
        db = sqlite3.connect(tmp)
        try:
            db.executescript(SCHEMA)
            db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
            db.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", features)
            db.executemany("INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", examples)
            db.executemany("INSERT INTO contexts VALUES (?, ?, ?, ?)", contexts)
            db.executemany("INSERT INTO vocab VALUES (?, ?, ?)", vocab)
            db.executemany("INSERT INTO token_index VALUES (?, ?, ?)", token_index)
            db.commit()
        finally:
            db.close()


def read_meta(path: Path) -> dict[str, Any] | None:
    """The meta table of an examples file, or None where there is none or it cannot be read."""
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        finally:
            db.close()
    except sqlite3.Error:
        return None


# --- reading ----------------------------------------------------------------------------------


@dataclass
class Example:
    kind: str
    rank: int
    quantile: int | None
    value: float
    doc: int
    position: int
    tokens: list[int]  # the window within its document
    acts: list[float]  # the latent's activation on each token
    peak: int  # index in `tokens` of the example's own token

    def as_dict(self, pieces: dict[int, str]) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "rank": self.rank,
            "quantile": self.quantile,
            "value": self.value,
            "doc": self.doc,
            "position": self.position,
            "peak": self.peak,
            "tokens": [pieces.get(t, "") for t in self.tokens],
            "acts": [round(a, 4) for a in self.acts],
        }


@dataclass
class Context:
    tokens: list[int]
    active: frozenset[int]  # latents active anywhere in the window


def _window(tokens_blob: bytes, acts_blob: bytes | None, before: int) -> tuple[list[int], list[float], int]:
    tokens = np.frombuffer(tokens_blob, dtype="<i4")
    keep = tokens >= 0
    acts = np.frombuffer(acts_blob, dtype="<f4")[keep].tolist() if acts_blob is not None else []
    return tokens[keep].tolist(), acts, before - int((~keep[:before]).sum())


class ExamplesDB:
    """Read access to an examples file (safe to share between threads)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = read_meta(self.path)
        if meta is None or meta.get("format") != FORMAT:
            raise HsaeError(f"{self.path} is not an hsae examples file: build it with `hsae examples`")
        if meta.get("version") != FORMAT_VERSION:
            raise HsaeError(f"{self.path} has examples format {meta.get('version')}: rebuild it with `hsae examples`")
        self.meta = meta
        self.before = int(meta["window"]["before"])
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
            self._local.db = db
        return db

    def stamp(self) -> dict[str, Any]:
        """Which examples a derived file (labels, scores) was computed from."""
        return {"model": self.meta["identity"]["model"], "created": self.meta.get("created")}

    @property
    def n_latents(self) -> int:
        return int(self.meta["n_latents"])

    def densities(self) -> np.ndarray:
        """(n_latents,) firing density of every latent."""
        out = np.zeros(self.n_latents)
        for i, density in self._db().execute("SELECT id, density FROM features"):
            out[i] = density
        return out

    def feature(self, latent: int) -> dict[str, Any] | None:
        row = (
            self._db()
            .execute(
                "SELECT fires, density, max_act, min_act, hist, cofire, promoted, suppressed "
                "FROM features WHERE id = ?",
                (latent,),
            )
            .fetchone()
        )
        if row is None:
            return None
        fires, density, max_act, min_act, hist, cofire, promoted, suppressed = row
        return {
            "fires": fires,
            "density": density,
            "max_act": max_act,
            "min_act": min_act,
            "hist": json.loads(hist),
            "cofire": json.loads(cofire),
            "promoted": json.loads(promoted) if promoted else None,
            "suppressed": json.loads(suppressed) if suppressed else None,
        }

    def examples(self, latent: int, kind: str | None = None) -> list[Example]:
        query = "SELECT kind, rank, quantile, value, doc, position, tokens, acts FROM examples WHERE latent = ?"
        args: tuple = (latent,)
        if kind is not None:
            query, args = query + " AND kind = ?", (latent, kind)
        out = []
        for kind_, rank, quantile, value, doc, position, tokens, acts in self._db().execute(
            query + " ORDER BY kind, rank", args
        ):
            ids, values, peak = _window(tokens, acts, self.before)
            out.append(Example(kind_, rank, quantile, value, doc, position, ids, values, peak))
        return out

    def contexts(self) -> list[Context]:
        out = []
        for tokens, active in self._db().execute("SELECT tokens, active FROM contexts ORDER BY id"):
            ids, _, _ = _window(tokens, None, self.before)
            latents = np.frombuffer(active, dtype="<i4")
            out.append(Context(ids, frozenset(latents[latents >= 0].tolist())))
        return out

    def pieces(self, token_ids: Iterable[int]) -> dict[int, str]:
        ids = sorted(set(int(t) for t in token_ids))
        out: dict[int, str] = {}
        for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            out.update(self._db().execute(f"SELECT id, text FROM vocab WHERE id IN ({marks})", chunk).fetchall())
        return out

    def token_counts(self) -> dict[int, int]:
        return dict(self._db().execute("SELECT id, count FROM vocab WHERE count > 0").fetchall())

    def token_index(self, per_token: int = 50) -> dict[str, list[int]]:
        """token -> the latents firing on it in their top examples, most often first (at most per_token)."""
        out: dict[str, list[int]] = {}
        for token, latent in self._db().execute("SELECT token, latent FROM token_index ORDER BY token, n DESC, latent"):
            hits = out.setdefault(token, [])
            if len(hits) < per_token:
                hits.append(int(latent))
        return out

    def search_tokens(self, token: str, limit: int = 50) -> list[tuple[int, int]]:
        """(latent, times) of latents whose top examples fire on `token` (normalised), most first."""
        rows = self._db().execute(
            "SELECT latent, n FROM token_index WHERE token = ? ORDER BY n DESC, latent LIMIT ?", (token, limit)
        )
        return [(int(latent), int(n)) for latent, n in rows]


def open_examples(model_dir: str | Path) -> ExamplesDB:
    """The model's examples file, or an error naming the command that builds it."""
    path = examples_path(model_dir)
    if not path.is_file():
        raise HsaeError(
            f"{model_dir} has no examples yet ({EXAMPLES_FILE}): build them with `hsae examples {model_dir}`"
        )
    return ExamplesDB(path)
