"""The examples pass: what it keeps per latent is what a brute-force pass over dense codes finds; it
resumes exactly, keeps both tails of signed codes, stays bounded in memory, and the CLI finds its data."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

import hsae
from hsae.cli import main
from hsae.errors import HsaeError
from hsae.interpret.examples import ExamplesConfig, ExamplesPass, build_examples
from hsae.interpret.examples_db import ExamplesDB, open_examples
from hsae.interpret.streams import TokenChunk
from hsae.interpret.tables import BestPerLatent
from hsae.sources.hf import load_model
from interpret_fixtures import gpt2_model, minilm_model


@pytest.fixture(scope="module")
def minilm():
    return load_model(None, device="cpu")


class SignedLinearSAE(torch.nn.Module):
    """A stand-in SAE: dense, signed codes (x @ W with small entries zeroed), as an AbsTopK would give."""

    arch = "signed-test"

    def __init__(self, d_in: int, n_latents: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.randn(d_in, n_latents, generator=g)
        self.W_dec = torch.randn(n_latents, d_in, generator=g)
        self.b_dec = torch.zeros(d_in)
        self.n_latents, self.d_in = n_latents, d_in

    def encode(self, x):
        codes = x @ self.W_enc
        return torch.where(codes.abs() > 1.5, codes, torch.zeros(()))


class ArrayStream:
    """Rows held in memory, in chunks, resumable by row count (the StoreStream protocol)."""

    def __init__(self, acts, tokens, docs, positions, loaded, chunk=97):
        self.acts, self.tokens, self.docs, self.positions = acts, tokens, docs, positions
        self.loaded, self.chunk = loaded, chunk
        self.total_rows = acts.shape[0]

    def describe(self):
        return {"kind": "test", "rows": self.total_rows}

    def load_model(self):
        return self.loaded

    def label_names(self):
        return None  # text rows

    def chunks(self, place=None):
        for lo in range(int(place or 0), self.total_rows, self.chunk):
            hi = min(lo + self.chunk, self.total_rows)
            yield TokenChunk(self.acts[lo:hi], self.tokens[lo:hi], self.docs[lo:hi], self.positions[lo:hi], hi)


def random_rows(n=1500, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 15, (n,), generator=g)
    docs = torch.repeat_interleave(torch.arange(n), lengths)[:n]
    starts = torch.searchsorted(docs, docs)  # first row of each row's document
    positions = torch.arange(n) - starts + 1
    tokens = torch.randint(1000, 3000, (n,), generator=g)
    return torch.randn(n, d, generator=g), tokens, docs, positions


def test_best_per_latent_keeps_the_largest_keys_of_a_stream():
    g = torch.Generator().manual_seed(3)
    table = BestPerLatent(7, 5, {"id": ((), torch.long, -1)})
    all_lat, all_key = [], []
    for _ in range(20):
        lat = torch.randint(0, 7, (60,), generator=g)
        key = torch.rand(60, generator=g)
        ids = torch.arange(len(all_key) * 60, len(all_key) * 60 + 60)
        table.offer(lat, key, lambda e, ids=ids: {"id": ids[e]})
        all_lat.append(lat)
        all_key.append(key)
    lat, key = torch.cat(all_lat), torch.cat(all_key)
    for i in range(7):
        expected = set(torch.nonzero(lat == i).squeeze(1)[key[lat == i].topk(5).indices].tolist())
        assert set(table.payload["id"][i].tolist()) == expected


def test_pass_matches_a_brute_force_pass_over_dense_codes(minilm, tmp_path):
    acts, tokens, docs, positions = random_rows()
    sae = SignedLinearSAE(16, 24)
    cfg = ExamplesConfig(
        top=6, quantiles=4, per_quantile=3, before=3, after=2, random_contexts=50, batch_rows=64, chunk_rows=150
    )
    run = build_examples(
        sae, tmp_path, ArrayStream(acts, tokens, docs, positions, minilm), cfg, out=tmp_path / "e.sqlite"
    )
    db = ExamplesDB(run.path)
    dense = sae.encode(acts)
    assert db.meta["rows"] == acts.shape[0]
    for i in range(sae.n_latents):
        column = dense[:, i]
        stats = db.feature(i)
        assert stats["fires"] == int((column != 0).sum())
        assert sum(stats["hist"]) == stats["fires"]  # every firing in one bin (both signs)
        top = db.examples(i, "top")
        positive = column[column > 0]
        assert [round(e.value, 4) for e in top] == [
            round(v, 4) for v in positive.sort(descending=True).values[:6].tolist()
        ]
        bottom = db.examples(i, "bottom")
        negative = column[column < 0]
        assert [round(e.value, 4) for e in bottom] == [round(v, 4) for v in negative.sort().values[:6].tolist()]
        for e in top + bottom:
            row = int(((column - e.value).abs() < 1e-5).nonzero()[0])
            assert e.doc == int(docs[row]) and e.position == int(positions[row])
            same_doc = [r for r in range(row - 3, row + 3) if 0 <= r < len(docs) and docs[r] == docs[row]]
            assert e.tokens == tokens[same_doc].tolist()
            assert np.allclose(e.acts, column[same_doc].tolist(), atol=1e-5)
            assert e.tokens[e.peak] == int(tokens[row])
        quantile = db.examples(i, "quantile")
        assert len(quantile) == min(12, stats["fires"])
        assert all(any(abs(float(v) - e.value) < 1e-5 for v in column[column != 0]) for e in quantile)
        assert [e.value for e in quantile] == sorted(e.value for e in quantile)  # lowest quantile first
        both = (dense != 0) & (column != 0)[:, None]
        for j, share, lift in stats["cofire"]:  # latents that really fire with it, on sampled firings
            assert j != i and both[:, j].any() and 0 < share <= 1
            assert lift == pytest.approx(share / db.feature(j)["density"], rel=0.01)
    for context in db.contexts():  # each window lists every latent active anywhere in it
        rows = [r for r in range(len(tokens)) if tokens[r : r + len(context.tokens)].tolist() == context.tokens]
        assert any(
            set((dense[r : r + len(context.tokens)] != 0).any(0).nonzero().squeeze(1).tolist()) == context.active
            for r in rows
        )


def test_interrupted_pass_resumes_to_the_same_file(minilm, tmp_path):
    acts, tokens, docs, positions = random_rows(900)
    sae = SignedLinearSAE(16, 24, seed=1)
    cfg = ExamplesConfig(
        top=5, quantiles=3, per_quantile=2, before=2, after=2, random_contexts=40, chunk_rows=120, checkpoint_seconds=0
    )
    stream = ArrayStream(acts, tokens, docs, positions, minilm)
    whole = build_examples(sae, tmp_path, stream, cfg, out=tmp_path / "whole.sqlite")

    def stop_midway(done, total):
        if done > 400:
            raise KeyboardInterrupt

    out = tmp_path / "resumed.sqlite"
    with pytest.raises(KeyboardInterrupt):
        build_examples(sae, tmp_path, stream, cfg, out=out, progress=stop_midway)
    assert not out.exists() and (tmp_path / "resumed.sqlite.partial").exists()
    resumed = build_examples(sae, tmp_path, stream, cfg, out=out)
    assert 0 < resumed.resumed_at < 900 and not (tmp_path / "resumed.sqlite.partial").exists()

    def tables(path):
        db = sqlite3.connect(path)
        return [db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in ("features", "examples", "contexts")]

    assert tables(whole.path) == tables(out)
    again = build_examples(sae, tmp_path, stream, cfg, out=out)
    assert again.reused


def test_memory_is_bounded_whatever_the_number_of_tokens(minilm):
    sae = SignedLinearSAE(16, 24)
    sizes = []
    for n in (500, 3000):
        acts, tokens, docs, positions = random_rows(n)
        cfg = ExamplesConfig(top=5, quantiles=3, per_quantile=2, random_contexts=30, chunk_rows=200)
        run = ExamplesPass(sae, cfg)
        for chunk in ArrayStream(acts, tokens, docs, positions, minilm).chunks():
            run.feed(chunk)
        # everything but the token counts (at most the vocabulary) and the few rows of context held back
        kept = {
            k: t for k, t in run.tensors().items() if k != "token_counts" and not k.startswith(("left.", "pending."))
        }
        sizes.append(sum(t.numel() for t in kept.values()))
        assert len(run.left) <= cfg.before and run.pending_rows < cfg.chunk_rows + cfg.after + 97
    assert sizes[0] == sizes[1]


def test_examples_cli_on_a_store_and_on_the_fly():
    db = open_examples(minilm_model())
    assert db.meta["identity"]["data"]["kind"] == "store" and db.meta["rows"] > 1000
    fired = [i for i in range(db.n_latents) if db.feature(i)["fires"]]
    example = db.examples(fired[0], "top")[0]
    assert example.acts[example.peak] == pytest.approx(example.value)
    gpt2 = open_examples(gpt2_model())
    assert gpt2.meta["identity"]["data"]["kind"] == "model" and gpt2.meta["logit_lens"]


def test_logit_lens_promotes_what_the_decoder_row_times_the_unembedding_ranks_first():
    model_dir = gpt2_model()
    db = open_examples(model_dir)
    sae = hsae.load(model_dir)
    w_u = load_model(str(model_dir.parent / "gpt2-base")).model.get_output_embeddings().weight.detach()
    row = sae.W_dec[5].detach() / sae.W_dec[5].detach().norm()
    expected = (w_u @ row).topk(10).indices.tolist()
    assert [t for t, _ in db.feature(5)["promoted"]] == expected


def test_examples_cli_refuses_what_it_cannot_read(tmp_path, capsys):
    model_dir = minilm_model()
    assert main(["examples", str(model_dir), "--data", str(tmp_path)]) == 2
    assert "not an activation store" in capsys.readouterr().err
    assert main(["examples", str(model_dir), "--data", str(tmp_path), "--corpus", "wordnet"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["examples", str(model_dir), "--top", "0"]) == 2
    assert "top must be positive" in capsys.readouterr().err
    with pytest.raises(HsaeError, match="hsae examples"):
        open_examples(tmp_path)
