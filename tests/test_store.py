"""The activation store: harvest, resume after a crash, checksums, and the shuffling reader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import hsae.sources.harvest as harvest_module
import hsae.store as store_module
from hsae.errors import HsaeError
from hsae.sources.base import ActivationSource
from hsae.sources.harvest import harvest_to_store
from hsae.sources.hf import DEFAULT_HOOK, Harvester, load_model
from hsae.store import ActivationStore

# ~40 short documents, ~450 tokens without special tokens.
TOPICS = ("dogs", "trees", "music", "rivers", "stone")
PLACES = ("sky", "city", "sea", "law", "fire", "ice", "art", "war")
TEXTS = [
    f"Sentence {i} is about {w} and how {w} relates to the {v} in example number {i}."
    for i, (w, v) in enumerate((w, v) for w in TOPICS for v in PLACES)
]


@pytest.fixture(scope="module")
def minilm():
    return load_model(device="cpu")


def make_harvester(minilm, hooks=(DEFAULT_HOOK,)):
    return Harvester(minilm, list(hooks), batch_tokens=128, max_length=32, sort_window=16)


def harvest(minilm, out, tokens=400, shard_rows=60, **kwargs):
    return harvest_to_store(out, make_harvester(minilm), TEXTS, tokens=tokens, shard_rows=shard_rows, **kwargs)


def store_rows(path):
    """Every tensor of every shard, concatenated in harvest order."""
    store = ActivationStore.open(path)
    shards = list(store.iter_shards())
    return {key: torch.cat([s[key] for s in shards]) for key in shards[0]}


@pytest.fixture(scope="module")
def reference(minilm, tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "store"
    harvest(minilm, path)
    return path


def test_store_holds_the_harvested_rows_and_a_manifest(minilm, reference):
    store = ActivationStore.open(reference)
    manifest = json.loads((reference / "manifest.json").read_text())
    assert store.total_rows == 400 and manifest["status"] == "complete"
    assert [s["rows"] for s in manifest["shards"]] == [60] * 6 + [40]
    assert manifest["hooks"] == [{"name": DEFAULT_HOOK, "transformer_lens": "blocks.3.hook_resid_post", "d_in": 384}]
    assert manifest["model"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert store.d_in == 384 and store.dtype == "float32"
    # The same rows as the harvester gives directly.
    direct = [b.rows for b in make_harvester(minilm).batches(TEXTS)]
    rows = store_rows(reference)
    assert torch.equal(rows["activations"], torch.cat([r.activations[DEFAULT_HOOK] for r in direct])[:400])
    assert torch.equal(rows["token_ids"], torch.cat([r.token_ids for r in direct])[:400])
    assert torch.equal(rows["doc_ids"], torch.cat([r.doc_ids for r in direct])[:400])
    assert torch.equal(rows["positions"], torch.cat([r.positions for r in direct])[:400])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_stores(minilm, reference, tmp_path, dtype):
    store = harvest(minilm, tmp_path / "s", dtype=dtype)
    with safe_open(str(tmp_path / "s" / "shard-00000.safetensors"), framework="pt") as fh:
        assert fh.get_tensor(f"activations/{DEFAULT_HOOK}").dtype == store_module.DTYPES[dtype]
    full = store_rows(reference)["activations"]
    half = store_rows(tmp_path / "s")["activations"]
    assert half.dtype == torch.float32  # readers always hand out float32
    torch.testing.assert_close(half, full, rtol=1e-2, atol=2e-2)
    assert next(store.batches(8)).dtype == torch.float32


def test_corpus_shorter_than_the_target(minilm, tmp_path):
    store = harvest(minilm, tmp_path / "s", tokens=10**6, shard_rows=200)
    assert 300 < store.total_rows < 10**6
    assert store.manifest["target_rows"] == 10**6


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at_write", [1, 3, 6])
def test_crash_at_a_shard_write_then_resume_gives_the_same_store(
    minilm, reference, tmp_path, monkeypatch, crash_at_write
):
    real_write = harvest_module.write_safetensors
    writes = []

    def failing_write(path, tensors, metadata=None):
        writes.append(path)
        if len(writes) == crash_at_write:
            raise Crash  # as if killed while writing this shard
        real_write(path, tensors, metadata)

    monkeypatch.setattr(harvest_module, "write_safetensors", failing_write)
    with pytest.raises(Crash):
        harvest(minilm, tmp_path / "s")
    with pytest.raises(HsaeError, match="incomplete"):
        ActivationStore.open(tmp_path / "s")
    monkeypatch.setattr(harvest_module, "write_safetensors", real_write)
    harvest(minilm, tmp_path / "s")
    resumed = json.loads((tmp_path / "s/manifest.json").read_text())
    assert resumed["shards"] == ActivationStore.open(reference).manifest["shards"]  # same bytes


def test_crash_between_shards_then_resume_gives_the_same_store(minilm, reference, tmp_path):
    def stop_after(rows):
        def progress(done, total):
            if done >= rows:
                raise Crash

        return progress

    for rows in (100, 250, 390):  # stop three times, at different points between shard writes
        with pytest.raises(Crash):
            harvest(minilm, tmp_path / "s", progress=stop_after(rows))
    harvest(minilm, tmp_path / "s")
    assert torch.equal(store_rows(tmp_path / "s")["activations"], store_rows(reference)["activations"])
    assert ActivationStore.open(tmp_path / "s").manifest["shards"] == ActivationStore.open(reference).manifest["shards"]


def test_rerunning_a_complete_harvest_changes_nothing(minilm, reference, tmp_path):
    harvest(minilm, tmp_path / "s")
    before = (tmp_path / "s/manifest.json").read_text()
    harvest(minilm, tmp_path / "s")
    assert (tmp_path / "s/manifest.json").read_text() == before


def test_refuses_other_folders_and_other_settings(minilm, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(HsaeError, match="not empty and is not an activation store"):
        harvest(minilm, other)
    assert (other / "notes.txt").read_text() == "mine"
    harvest(minilm, tmp_path / "s", tokens=100)
    with pytest.raises(HsaeError, match="other settings.*dtype"):
        harvest(minilm, tmp_path / "s", tokens=100, dtype="float16")


def test_corrupted_shard_is_named(reference, tmp_path):
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(reference, copy)
    shard = copy / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = ActivationStore.open(copy)
    with pytest.raises(HsaeError, match="shard-00002.safetensors is corrupted"):
        store.verify()
    with pytest.raises(HsaeError, match="shard-00002.safetensors is corrupted"):
        for _ in zip(range(100), store.batches(50), strict=False):
            pass


def test_reader_is_a_source_that_resumes_at_any_step(reference):
    store = ActivationStore.open(reference, seed=7, buffer_rows=130)  # windows of 2 shards
    assert isinstance(store, ActivationSource)
    assert store.describe()["hook_transformer_lens"] == "blocks.3.hook_resid_post"
    stream = store.batches(48)
    first = [next(stream) for _ in range(20)]  # 960 rows: more than two epochs of 400
    again = ActivationStore.open(reference, seed=7, buffer_rows=130).batches(48)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=False))
    for start in (1, 8, 9, 17):
        resumed = store.batches(48, start_step=start)
        assert torch.equal(next(resumed), first[start])
        assert torch.equal(next(resumed), first[start + 1])
    # One epoch is a permutation of all rows, and shuffling crosses shard boundaries.
    epoch = torch.cat(first)[:400]
    rows = store_rows(reference)["activations"]
    assert torch.equal(epoch[torch.argsort(epoch[:, 0])], rows[torch.argsort(rows[:, 0])])
    assert not torch.equal(epoch, rows)
    other_seed = next(ActivationStore.open(reference, seed=8).batches(48))
    assert not torch.equal(other_seed, first[0])


def test_ranks_read_disjoint_shards(reference):
    store = ActivationStore.open(reference, buffer_rows=60)
    rows = store_rows(reference)["activations"]
    per_rank = []
    for rank in (0, 1):
        shards = store._rank_shards(rank, 2)
        n = sum(s.rows for s in shards)
        per_rank.append(torch.cat([next(store.batches(n, rank=rank, world_size=2))]))
    both = torch.cat(per_rank)
    assert len(both) == 400
    assert torch.equal(both[torch.argsort(both[:, 0])], rows[torch.argsort(rows[:, 0])])
    with pytest.raises(HsaeError, match="too few"):
        next(store.batches(8, rank=0, world_size=8))


def test_width_check_and_bad_input(reference, tmp_path):
    store = ActivationStore.open(reference)
    store.check_compatible(384)
    with pytest.raises(HsaeError, match="width 384.*d_in=512"):
        store.check_compatible(512)
    with pytest.raises(HsaeError, match="no hook 'encoder.layer.5'"):
        ActivationStore.open(reference, hook="encoder.layer.5")
    with pytest.raises(HsaeError, match="does not exist"):
        ActivationStore.open(tmp_path / "missing")
    with pytest.raises(HsaeError, match="dtype 'int8'"):
        store_module.parse_dtype("int8")
    assert store.sample(30).shape == (30, 384)


def test_several_hooks_in_one_store(minilm, tmp_path):
    harvester = make_harvester(minilm, ["encoder.layer.1", "encoder.layer.3"])
    harvest_to_store(tmp_path / "s", harvester, TEXTS, tokens=100, shard_rows=50)
    with pytest.raises(HsaeError, match="several hooks"):
        ActivationStore.open(tmp_path / "s")
    one = ActivationStore.open(tmp_path / "s", hook="encoder.layer.1")
    three = ActivationStore.open(tmp_path / "s", hook="encoder.layer.3")
    assert not torch.equal(one.read_shard(0)["activations"], three.read_shard(0)["activations"])


def _with_outliers(reference, out):
    """A copy of the reference store with three rows scaled 50x (checksums updated)."""
    import hashlib
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    scaled = []
    for shard, rows in ((1, (5, 17)), (4, (3,))):
        file = out / manifest["shards"][shard]["file"]
        tensors = load_file(str(file))
        acts = tensors[f"activations/{DEFAULT_HOOK}"]
        for r in rows:
            acts[r] *= 50
            scaled.append(acts[r].clone())
        save_file(tensors, str(file))
        manifest["shards"][shard]["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    return torch.stack(scaled)


def test_norm_outliers_are_left_out_of_the_stream_and_resume_stays_exact(reference, tmp_path):
    outliers = _with_outliers(reference, tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s", seed=3, buffer_rows=130)
    limit = store.describe()["norm_limit"]
    median = float(store.read_shard(0, all_fields=False)["activations"].norm(dim=1).median())
    assert limit == pytest.approx(10 * median)
    stream = store.batches(48)
    first = [next(stream) for _ in range(20)]  # more than two epochs of the 397 kept rows
    seen = torch.cat(first)
    assert float(seen.norm(dim=1).max()) <= limit
    assert not any(torch.equal(row, o) for o in outliers for row in seen[:397])
    kept = store_rows(tmp_path / "s")["activations"]  # interpretation still sees every row
    assert len(kept) == 400
    kept = kept[kept.norm(dim=1) <= limit]
    epoch = seen[:397]
    assert torch.equal(epoch[torch.argsort(epoch[:, 0])], kept[torch.argsort(kept[:, 0])])
    for start in (1, 8, 9, 17):  # resumed readers (fresh objects: no counts cached) agree
        resumed = ActivationStore.open(tmp_path / "s", seed=3, buffer_rows=130).batches(48, start_step=start)
        assert torch.equal(next(resumed), first[start])
    sample = store.sample(10_000)  # at most one epoch of the kept rows: none twice
    assert len(sample) == 397 and len(torch.unique(sample, dim=0)) == 397
    assert torch.equal(store.sample(100), torch.cat(first)[:100])
    everything = ActivationStore.open(tmp_path / "s", seed=3, buffer_rows=130, max_norm_ratio=0)
    assert everything.describe()["norm_limit"] is None
    assert float(torch.cat([next(everything.batches(400))]).norm(dim=1).max()) > limit
    with pytest.raises(HsaeError, match="max_norm_ratio must be >= 1"):
        ActivationStore.open(tmp_path / "s", max_norm_ratio=0.5)
