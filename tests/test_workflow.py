"""A researcher's workflow (issue 16): held-out data, hook names, multi-hook stores, the run's size
and length in the units people think in, one device rule, readable `info` and `compare` output."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import hsae
from hsae.cli import main
from hsae.errors import HsaeError, HsaeWarning
from hsae.sources import open_source
from hsae.sources.stream import in_split
from hsae.store import ActivationStore

TWO_HOOKS = "encoder.layer.1,encoder.layer.3"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    words = ("dogs", "trees", "music", "rivers", "stone", "glass", "bread", "snow")
    path.write_text(
        "\n".join(f"Note {i}: the {a} by the {b} stayed." for i, a in enumerate(words * 12) for b in words[:2])
    )
    return path


@pytest.fixture(scope="module")
def two_hook_store(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("stores") / "two"
    args = ["harvest", "--out", str(out), "--tokens", "1500", "--corpus", str(corpus), "--shard-rows", "500"]
    assert main([*args, "--hook", TWO_HOOKS, "-q"]) == 0
    return out


def _train(out, data, *extra):
    return main(
        [
            "train",
            "--arch",
            "topk",
            "--data",
            str(data),
            "--k",
            "4",
            "--batch-size",
            "64",
            "-q",
            "--out",
            str(out),
            *extra,
        ]
    )


# ----- held-out documents ----------------------------------------------------------------------------
def test_splits_are_disjoint_whole_documents_and_cover_the_store(two_hook_store):
    kw = {"hook": "encoder.layer.3", "max_norm_ratio": 0}
    train = ActivationStore.open(two_hook_store, split="train", **kw)
    held = ActivationStore.open(two_hook_store, split="heldout", **kw)
    everything = ActivationStore.open(two_hook_store, **kw)
    assert train.epoch_rows() + held.epoch_rows() == everything.epoch_rows() == 1500
    assert 0 < held.epoch_rows() < 0.2 * 1500
    rows = torch.cat([r.activations["encoder.layer.3"] for r in everything.rows()])
    docs = torch.cat([r.doc_ids for r in everything.rows()])
    heldout_rows = rows[in_split(docs, "heldout", 20)]
    sample = held.sample(10_000)  # the whole split, each row once
    assert len(sample) == held.epoch_rows()
    key = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    assert torch.equal(key(sample), key(heldout_rows))
    assert (docs[in_split(docs, "heldout", 20)] % 20 == 19).all()
    first = torch.cat([next(train.batches(train.epoch_rows()))])
    assert not any(torch.equal(r, h) for r in first[:200] for h in heldout_rows)


def test_eval_reads_the_heldout_split_and_says_so(two_hook_store, tmp_path):
    out = tmp_path / "m"
    assert _train(out, two_hook_store, "--hook", "encoder.layer.3", "--n-latents", "64", "--steps", "5") == 0
    record = json.loads((out / "config.json").read_text())
    assert record["data"]["split"] == "train" and record["data"]["heldout_every"] == 20
    assert main(["eval", str(out), "-m", "core"]) == 0
    core = json.loads((out / "eval" / "report.json").read_text())["sections"]["core"]
    held = ActivationStore.open(two_hook_store, hook="encoder.layer.3", split="heldout").epoch_rows()
    assert core["heldout"] is True and core["tokens"] == held
    assert core["seconds"] >= 0


def test_a_run_on_every_row_is_evaluated_on_every_row_and_not_called_heldout(tmp_path):
    x = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    np.save(tmp_path / "acts.npy", x)
    out = tmp_path / "m"
    assert _train(out, tmp_path / "acts.npy", "--n-latents", "16", "--steps", "3", "--heldout-every", "0") == 0
    assert main(["eval", str(out), "-m", "core"]) == 0
    core = json.loads((out / "eval" / "report.json").read_text())["sections"]["core"]
    assert core["heldout"] is False and core["tokens"] == 400


def test_epochs_are_reported_and_repeats_warned(tmp_path, capsys):
    x = np.random.default_rng(1).standard_normal((400, 8)).astype(np.float32)
    np.save(tmp_path / "acts.npy", x)
    out = tmp_path / "m"
    assert _train(out, tmp_path / "acts.npy", "--n-latents", "16", "--steps", "20", "--log-every", "10") == 0
    err = capsys.readouterr().err
    assert "warning: training reads the data 3.37 times (380 rows" in err  # 20 steps x 64 / 380 train rows
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [round(ln["epochs"], 3) for ln in lines] == [round(640 / 380, 3), round(1280 / 380, 3)]
    source = open_source(str(tmp_path / "acts.npy"))
    assert source.epoch_rows() == 380 and source.describe()["split"] == "train"
    with warnings.catch_warnings():
        warnings.simplefilter("error", HsaeWarning)
        assert _train(tmp_path / "once", tmp_path / "acts.npy", "--n-latents", "16", "--steps", "5") == 0


# ----- hooks -----------------------------------------------------------------------------------------
def test_train_selects_a_hook_of_a_multi_hook_store(two_hook_store, tmp_path, capsys):
    assert _train(tmp_path / "none", two_hook_store, "--n-latents", "64", "--steps", "2") == 2
    assert "holds several hooks" in capsys.readouterr().err
    assert (
        _train(
            tmp_path / "tl", two_hook_store, "--hook", "blocks.1.hook_resid_post", "--n-latents", "64", "--steps", "2"
        )
        == 0
    )
    assert json.loads((tmp_path / "tl" / "config.json").read_text())["data"]["hook"] == "encoder.layer.1"
    with pytest.raises(HsaeError, match="selects a hook of an hsae store"):
        open_source("synthetic", hook="encoder.layer.1")


def test_one_sae_per_hook_in_one_command(two_hook_store, tmp_path, capsys):
    out = tmp_path / "both"
    assert _train(out, two_hook_store, "--hook", TWO_HOOKS, "--expansion-factor", "0.25", "--tokens", "200") == 0
    printed = capsys.readouterr().out
    for hook in TWO_HOOKS.split(","):
        sae = hsae.load(out / hook)
        assert sae.n_latents == 96  # 0.25 x 384
        record = json.loads((out / hook / "config.json").read_text())
        assert record["data"]["hook"] == hook and record["train"]["steps"] == 4  # ceil(200 / 64)
        assert f"saved topk SAE (96 latents, d_in 384) to {out / hook}" in printed  # -q keeps the final line


def test_transformer_lens_names_resolve_to_modules():
    from hsae.sources.hf import canonical_hook, hook_sites, load_model

    loaded = load_model(None, device="cpu")
    assert canonical_hook(loaded.model, "blocks.0.hook_resid_post") == "encoder.layer.0"
    assert canonical_hook(loaded.model, "blocks.3.hook_resid_pre") == "encoder.layer.3:input"
    assert canonical_hook(loaded.model, "blocks.2.attn.hook_z") == "encoder.layer.2.attention.output.dense:input"
    assert canonical_hook(loaded.model, "encoder.layer.1") == "encoder.layer.1"
    sites = {s.name: s for s in hook_sites(loaded)}
    assert sites["encoder.layer.0.output.dropout"].passes_input_through
    assert not sites["encoder.layer.0.output.dense"].passes_input_through


def test_hooks_hides_pass_through_modules_unless_all(capsys):
    assert main(["hooks"]) == 0
    short = capsys.readouterr().out
    assert main(["hooks", "--all"]) == 0
    full = capsys.readouterr().out
    assert "Dropout" not in short and "Dropout" in full and "--all" in short


# ----- sizes, lengths, devices -----------------------------------------------------------------------
def test_size_length_and_device_options_refuse_what_makes_no_sense(tmp_path, capsys):
    base = ["train", "--arch", "topk", "--data", "synthetic", "--k", "2", "-q"]
    for extra, message in [
        (["--out", str(tmp_path / "a")], "--n-latents N or as --expansion-factor"),
        (["--n-latents", "32", "--expansion-factor", "2", "--out", str(tmp_path / "b")], "one"),
        (["--n-latents", "32", "--steps", "5", "--tokens", "100", "--out", str(tmp_path / "c")], "not both"),
        (["--n-latents", "32", "--device", "tpu", "--out", str(tmp_path / "d")], "--device 'tpu'"),
    ]:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err


def test_default_device_is_cuda_when_available_else_cpu(monkeypatch):
    from hsae.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == "cuda"


# ----- reading runs -----------------------------------------------------------------------------------
def test_info_is_a_table_without_json_blobs(two_hook_store, tmp_path, capsys):
    out = tmp_path / "m"
    assert _train(out, two_hook_store, "--hook", "encoder.layer.3", "--n-latents", "64", "--steps", "2") == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model.name" in printed and "corpus.kind" in printed and "{" not in printed


def test_compare_keeps_names_whole_reports_skips_once_and_takes_metrics(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["train", "--arch", "topk", "--data", "synthetic", "--n-latents", "32", "--k", "2", "--steps", "3",
                     "--batch-size", "64", "-q", "--out", str(tmp_path / name)]) == 0  # fmt: skip
    capsys.readouterr()
    args = ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--tokens", "256", "--out", str(tmp_path / "c")]
    assert main([*args, "-m", "core", "-m", "downstream"]) == 0
    printed = capsys.readouterr().out
    assert "core.explained_variance" in printed  # the longest name, not cut
    assert printed.count("downstream skipped (all models)") == 1
    assert "hierarchy." not in printed  # -m left it out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "missing"), "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()  # the missing folder is found before any evaluation


def test_eval_and_compare_read_a_model_at_many_k(tmp_path):
    out = tmp_path / "m"
    assert main(["train", "--arch", "topk", "--data", "synthetic", "--n-latents", "32", "--k", "4", "--steps", "5",
                 "--batch-size", "64", "-q", "--out", str(out)]) == 0  # fmt: skip
    assert main(["eval", str(out), "--tokens", "512", "--k", "2,4,8", "-m", "core", "-m", "over_k"]) == 0
    over_k = json.loads((out / "eval" / "report.json").read_text())["sections"]["over_k"]
    assert over_k["ks"] == [2, 4, 8] and [row["k"] for row in over_k["curve"]] == [2, 4, 8]
    compare = ["compare", str(out), str(out), "--tokens", "256", "--k", "2,4", "-m", "core", "-m", "over_k"]
    assert main([*compare, "--out", str(tmp_path / "c")]) == 0
    assert "one model at many k" in (tmp_path / "c" / "report.html").read_text()
