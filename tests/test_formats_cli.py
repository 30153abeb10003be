"""`hsae import`, `hsae export` and `hsae push` as a user runs them; an imported SAE goes through
`hsae eval` like a trained one."""

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hsae
from hsae.cli import main
from hsae.config import from_dict
from hsae.models import get_family
from hsae.models.codes import to_dense

DATA = Path(__file__).parent / "data" / "formats"


def test_import_then_eval_an_saelens_sae(tmp_path, capsys):
    assert main(["import", str(DATA / "saelens" / "topk"), str(tmp_path / "m")]) == 0
    assert "imported saelens topk as an hsae topk SAE (8 -> 16 latents)" in capsys.readouterr().out
    acts = np.random.default_rng(0).normal(0.5, 1.5, size=(2048, 8)).astype("float32")
    np.save(tmp_path / "acts.npy", acts)
    assert main(["eval", str(tmp_path / "m"), "--data", str(tmp_path / "acts.npy"), "--tokens", "2048"]) == 0
    core = json.loads((tmp_path / "m" / "eval" / "report.json").read_text())["sections"]["core"]
    assert core["tokens"] == 2048 and 2.5 < core["l0"] <= 3.0  # TopK k=3, ReLU may leave a slot empty
    # The report's FVU is the imported model's own, on all the rows.
    model, x = hsae.load(tmp_path / "m"), torch.from_numpy(acts)
    x_hat = model.decode(model.encode(x)).detach()
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert abs(core["fvu"] - fvu) < 1e-3 * max(1.0, fvu)


def test_import_with_from_and_notes(tmp_path, capsys):
    path = DATA / "gemma_scope" / "layer_0" / "width_16" / "average_l0_3" / "params.npz"
    assert main(["import", str(path), str(tmp_path / "m"), "--from", "gemma_scope"]) == 0
    out = capsys.readouterr().out
    assert "as an hsae jumprelu SAE" in out and "b_dec @ W_enc added to b_enc" in out


def test_export_then_import_on_the_command_line(tmp_path, capsys):
    assert main(["export", str(DATA / "hsae" / "matryoshka"), str(tmp_path / "e"), "--to", "saelens"]) == 0
    assert "wrote cfg.json, sae_weights.safetensors, hsae.json" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "e"), str(tmp_path / "m")]) == 0
    x = load_file(str(DATA / "hsae" / "matryoshka" / "hsae.safetensors"))["x"]
    a, b = hsae.load(DATA / "hsae" / "matryoshka"), hsae.load(tmp_path / "m")
    assert b.arch == "matryoshka" and torch.allclose(to_dense(a.encode(x)), to_dense(b.encode(x)), atol=1e-5)


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["import", str(tmp_path / "missing"), str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "does not exist" in err
    assert main(["export", str(DATA / "hsae" / "jumprelu"), str(tmp_path / "e"), "--to", "sparsify"]) == 2
    assert "cannot hold a jumprelu SAE" in capsys.readouterr().err


def test_push_uploads_the_model_files(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir()), kwargs))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert main(["push", str(DATA / "hsae" / "topk"), "me/topk", "--private"]) == 0
    assert main(["push", str(DATA / "hsae" / "topk"), "me/topk", "--to", "saelens", "--path-in-repo", "l0"]) == 0
    assert calls[0] == ("create", "me/topk", {"private": True, "exist_ok": True})
    assert calls[1][:3] == ("upload", "me/topk", ["config.json", "weights.safetensors"])
    assert calls[3][2] == ["cfg.json", "hsae.json", "sae_weights.safetensors"] and calls[3][3]["path_in_repo"] == "l0"
    assert "https://huggingface.co/me/topk/commit/abc" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_and_examples_on_an_imported_saelens_sae(tmp_path):
    """An SAELens SAE for MiniLM's encoder.layer.3 (384 wide), imported, goes through `hsae eval` and
    `hsae examples` on a store harvested here, as a trained model does."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Sentence {i} is about rivers, stone and music at dawn." for i in range(60)) + "\n")
    store = tmp_path / "store"
    assert main(["harvest", "--out", str(store), "--tokens", "600", "--corpus", str(corpus)]) == 0
    family = get_family("topk")
    config = from_dict(family.config_class, {"arch": "topk", "d_in": 384, "n_latents": 64, "k": 4, "input_scale": 0.2})
    torch.manual_seed(0)
    family.from_config(config).save(tmp_path / "trained")
    assert main(["export", str(tmp_path / "trained"), str(tmp_path / "saelens"), "--to", "saelens"]) == 0
    (tmp_path / "saelens" / "hsae.json").unlink()  # as a folder from another library: no hsae sidecar
    assert main(["import", str(tmp_path / "saelens"), str(tmp_path / "m")]) == 0
    assert main(["eval", str(tmp_path / "m"), "--data", str(store), "--tokens", "512", "-m", "core"]) == 0
    assert json.loads((tmp_path / "m" / "eval" / "report.json").read_text())["sections"]["core"]["l0"] <= 4
    assert main(["examples", str(tmp_path / "m"), "--data", str(store), "--tokens", "600", "--top", "3"]) == 0
    with sqlite3.connect(tmp_path / "m" / "examples.sqlite") as db:
        n_features, fires = db.execute("SELECT COUNT(*), SUM(fires) FROM features").fetchone()
        n_top = db.execute("SELECT COUNT(*) FROM examples WHERE kind = 'top'").fetchone()[0]
    assert n_features == 64 and fires > 0 and n_top > 0
