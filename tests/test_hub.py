"""Hub names (hf://owner/repo/sub/folder@revision) resolved through huggingface_hub's own cache in
offline mode: the test builds a hub cache in a temporary folder (the layout the client writes:
models--owner--repo/refs/<branch> and snapshots/<commit>/...), and nothing reaches the network."""

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file

import hsae.formats as formats
from hsae.cli import main
from hsae.errors import HsaeError
from hsae.models.codes import to_dense

DATA = Path(__file__).parent / "data" / "formats"
OLD, NEW = "a" * 40, "b" * 40


def _cache_repo(cache: Path, repo_id: str, commits: dict[str, dict[str, Path]], main_commit: str) -> None:
    """A cached hub repo: for each commit, its files (repo path -> local source file)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(main_commit)
    for commit, files in commits.items():
        for name, source in files.items():
            target = repo / "snapshots" / commit / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)


def _folder(source: Path, under: str) -> dict[str, Path]:
    return {f"{under}/{p.name}": p for p in source.iterdir() if p.is_file()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    # A SAELens release: one folder per hook; main moved on from an older commit.
    _cache_repo(
        cache,
        "someone/gpt2-saes",
        {
            OLD: _folder(DATA / "saelens" / "jumprelu", "blocks.0.hook_resid_pre"),
            NEW: _folder(DATA / "saelens" / "topk", "blocks.0.hook_resid_pre"),
        },
        NEW,
    )
    # An hsae model at the repo's root.
    _cache_repo(cache, "someone/hsae-topk", {NEW: _folder(DATA / "hsae" / "topk", ".")}, NEW)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _reference(case: str):
    return load_file(str(DATA / "saelens" / case / "reference.safetensors"))


def test_load_an_saelens_release_folder_from_the_hub_cache(hub_cache):
    model = formats.load("hf://someone/gpt2-saes/blocks.0.hook_resid_pre")
    ref = _reference("topk")
    assert model.arch == "topk"
    assert torch.allclose(to_dense(model.encode(ref["x"])), ref["codes"], atol=1e-5)


def test_a_revision_pins_what_is_read(hub_cache):
    model = formats.load(f"hf://someone/gpt2-saes/blocks.0.hook_resid_pre@{OLD}")
    ref = _reference("jumprelu")
    assert model.arch == "jumprelu"
    assert torch.allclose(model.decode(model.encode(ref["x"])), ref["x_hat"], atol=1e-5)


def test_import_records_the_hub_name_and_commit(hub_cache, tmp_path):
    name = "hf://someone/gpt2-saes/blocks.0.hook_resid_pre"
    assert main(["import", name, str(tmp_path / "m")]) == 0
    origin = json.loads((tmp_path / "m" / "config.json").read_text())["imported"]
    assert origin["source"] == name and origin["revision"] == NEW and origin["format"] == "saelens"


def test_an_hsae_model_on_the_hub_loads_and_exports(hub_cache, tmp_path):
    model = formats.load("hf://someone/hsae-topk")
    assert model.arch == "topk" and model.config.input_scale == pytest.approx(1.7)
    assert main(["export", "hf://someone/hsae-topk", str(tmp_path / "e"), "--to", "sparsify"]) == 0
    assert formats.detect_format(tmp_path / "e") == "sparsify"


def test_what_is_not_cached_is_a_clear_error_offline(hub_cache):
    with pytest.raises(HsaeError, match="not in the local hub cache"):
        formats.load("hf://someone/not-downloaded")
    with pytest.raises(HsaeError, match="has no 'blocks.9.hook_resid_pre'"):
        formats.load("hf://someone/gpt2-saes/blocks.9.hook_resid_pre")
    with pytest.raises(HsaeError, match="holds several SAEs"):  # a release root: name one of its folders
        formats.load("hf://someone/gpt2-saes")
    with pytest.raises(HsaeError, match="not a hub name"):
        formats.load("hf://just-an-owner")


def test_hub_names_parse():
    ref = formats.parse_hub_name("hf://google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71@refs/pr/1")
    assert (ref.repo_id, ref.subfolder, ref.revision) == (
        "google/gemma-scope-2b-pt-res",
        "layer_20/width_16k/average_l0_71",
        "refs/pr/1",
    )
    assert str(ref) == "hf://google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71@refs/pr/1"
    assert not formats.is_hub_name("runs/topk")


def test_eval_info_and_compare_take_hub_names_of_hsae_models(hub_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["info", "hf://someone/hsae-topk"]) == 0
    assert "arch" in capsys.readouterr().out
    args = ["--data", "synthetic", "--synthetic", "d_in=8", "--tokens", "256", "-m", "core"]
    assert main(["eval", "hf://someone/hsae-topk", *args]) == 0
    assert (tmp_path / "eval-someone-hsae-topk" / "report.json").is_file()  # not into the hub cache
    compare = ["compare", "hf://someone/hsae-topk", "hf://someone/hsae-topk", "--out", str(tmp_path / "c")]
    assert main([*compare, *args]) == 0
    assert main(["info", "hf://someone/gpt2-saes/blocks.0.hook_resid_pre"]) == 2
    assert "hsae import hf://someone/gpt2-saes" in capsys.readouterr().err
