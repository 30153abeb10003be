"""`hsae concepts`, `hsae concept-search` and `hsae bias-audit` end to end on a tiny random ViT image
classifier: an image store with CLS rows (the head's input) and patch rows, an MSAE trained on the
CLS rows, names through the head, heatmaps from the patch rows, and the clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from hsae.cli import main
from hsae.cli.concepts import read_image_store
from hsae.config import TrainConfig, from_dict
from hsae.models import get_family
from hsae.models.codes import to_dense
from hsae.sources.files import ArrayActivations
from hsae.sources.harvest import harvest_to_store
from hsae.sources.images import image_folder
from hsae.sources.vision import ImageHarvester, load_vision_model, rows_for, write_image_index
from hsae.train import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(store folder, SAE folder) of a tiny ViT classifier on 12 captioned pictures in 3 folders."""
    from transformers import ViTConfig, ViTForImageClassification

    try:
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor
    base = tmp_path_factory.mktemp("concepts")
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=5, id2label={i: f"class{i}" for i in range(5)})  # fmt: skip
    ViTForImageClassification(config).save_pretrained(base / "vit")
    Processor(size={"height": 32, "width": 32}).save_pretrained(base / "vit")
    for i in range(12):
        folder = base / "pics" / ("red", "green", "blue")[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        color = [(220, 20, 20), (20, 200, 20), (20, 20, 220)][i % 3]
        Image.new("RGB", (32, 32), tuple(min(255, c + 5 * i) for c in color)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"a {folder.name} square\n")
    images = image_folder(base / "pics")
    loaded = load_vision_model(str(base / "vit"), device="cpu")
    harvester = ImageHarvester(loaded, ["vit.layernorm"], tokens="both")
    harvest_to_store(base / "store", harvester, images, tokens=rows_for(harvester, images))
    write_image_index(base / "store", images)
    store = read_image_store(base / "store")
    cfg = from_dict(get_family("msae").config_class, dict(arch="msae", d_in=16, n_latents=32, k=4))
    train = TrainConfig(steps=30, batch_size=12, log_every=30, checkpoint_every=30)
    Trainer(cfg, train, ArrayActivations(store.embeddings), base / "sae", show_progress=False).run()
    return base / "store", base / "sae"


def test_an_image_store_gives_one_embedding_per_image_and_the_grid_rows(run):
    store = read_image_store(run[0])
    assert store.embeddings.shape == (12, 16) and store.image_ids.tolist() == list(range(12))
    assert store.grid == (4, 4) and store.grid_rows.shape == (12 * 16, 16)
    assert store.label(0) in ("blue", "green", "red") and store.caption(0).endswith("square")


def test_concepts_names_through_the_head_with_heatmaps_search_and_audit(run, capsys):
    store_dir, sae_dir = run
    assert main(["concepts", str(sae_dir), "--data", str(store_dir), "--top", "4"]) == 0
    report = json.loads((sae_dir / "concepts.json").read_text())
    assert report["source"] == "head" and 0 < report["threshold"] < 1
    assert report["firing"] == len(report["concepts"]) > 0 and report["named"] <= report["firing"]
    entry = report["concepts"][0]
    assert entry["best"].startswith("class") and entry["word"] in ("red", "green", "blue", "square", None)
    assert entry["top_values"] == sorted(entry["top_values"], reverse=True)
    # a heatmap is the latent's code on the image's own patch rows
    import hsae

    model, store = hsae.load(sae_dir), read_image_store(store_dir)
    image, latent = entry["top_images"][0], entry["latent"]
    with torch.no_grad():
        codes = to_dense(model.encode(store.grid_rows[store.grid_ids == image]))
    assert entry["heatmaps"][0] == pytest.approx(codes[:, latent].tolist(), abs=1e-4)
    assert "raised" in report["bias_audit"][0] if report["bias_audit"] else report["named"] == 0
    assert {"before", "after", "query"} <= set(report["search"][0])
    assert "firing latents named" in capsys.readouterr().out


def test_concept_search_and_bias_audit_commands(run, capsys):
    store_dir, sae_dir = run
    assert main(["concept-search", str(sae_dir), "--data", str(store_dir), "--image", "0", "--latent", "1",
                 "--delta", "3", "--top", "3"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.split()[2].endswith(".png") for line in lines)
    assert main(["bias-audit", str(sae_dir), "--data", str(store_dir), "--latent", "1", "--top", "2"]) == 0
    printed = capsys.readouterr().out
    assert "mean change of class probability" in printed and printed.count("class") >= 4


def test_concept_commands_refuse_what_they_cannot_use(run, tmp_path, capsys):
    store_dir, sae_dir = run
    assert main(["concepts", str(sae_dir), "--data", str(tmp_path)]) == 2
    assert "not an image store" in capsys.readouterr().err
    assert main(["concept-search", str(sae_dir), "--data", str(store_dir), "--image", "99", "--latent", "0",
                 "--delta", "1"]) == 2  # fmt: skip
    assert "image 99 has no row" in capsys.readouterr().err
    (store_dir / "images.json").rename(store_dir / "images.moved")
    try:
        assert main(["concepts", str(sae_dir), "--data", str(store_dir)]) == 2
        assert "has no images.json" in capsys.readouterr().err
    finally:
        (store_dir / "images.moved").rename(store_dir / "images.json")
