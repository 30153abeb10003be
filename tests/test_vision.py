"""Vision hooks and the image harvester (hsae.sources.vision) on tiny random models built from config
(a ViT, a CNN, a CLIP with a BPE tokenizer built from merges), row layouts and their refusals, the
store they harvest into, and the embedded EfficientNet-Lite0 on TuxPaint stamps, killed mid-harvest
and resumed to identical shards."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from hsae.errors import HsaeError, HsaeWarning
from hsae.sources.clip_bpe import byte_symbols, read_merges, write_tokenizer_files
from hsae.sources.harvest import harvest_to_store
from hsae.sources.images import TUXPAINT_STAMPS, image_folder
from hsae.sources.vision import (
    ImageHarvester,
    image_rows,
    load_vision_model,
    module_shapes,
    rows_for,
    write_image_index,
)
from hsae.store import ActivationStore

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _pil_processor(**kw):
    try:
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor
    return Processor(**kw)


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32)  # fmt: skip
    ViTModel(config).save_pretrained(folder)
    _pil_processor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cnn_folder(tmp_path_factory):
    from transformers import ResNetConfig, ResNetModel

    folder = tmp_path_factory.mktemp("cnn")
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ResNetModel(config).save_pretrained(folder)
    _pil_processor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture
def pictures(tmp_path):
    """Six images in two labelled folders, mixed sizes, with captions."""
    root = tmp_path / "pics"
    for i in range(6):
        folder = root / ("red" if i % 2 else "blue")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + 3 * i, 24), (40 * i, 10, 200 - 30 * i)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"picture number {i}\n")
    return image_folder(root)


def test_vit_tokens_become_cls_patch_and_pooled_rows(vit_folder, pictures):
    loaded = load_vision_model(str(vit_folder), device="cpu")
    hook = "layers.1"
    pixels = loaded.pixel_values([pictures.open(it) for it in pictures])
    with torch.no_grad():
        hidden = loaded.model(pixel_values=pixels, output_hidden_states=True).hidden_states[2]  # (6, 17, 16)
    for tokens, expect_rows, expect in (
        ("cls", 1, hidden[:, :1]),
        ("patches", 16, hidden[:, 1:]),
        ("both", 17, hidden),
        ("pooled", 1, hidden[:, 1:].mean(1, keepdim=True)),
    ):
        harvester = ImageHarvester(loaded, [hook], tokens=tokens, batch_images=4, pad_square=False)
        layout = harvester.describe()
        assert layout["rows_per_image"] == expect_rows and layout["grid"] == [4, 4]
        rows = harvester.run(pictures, pictures.items)
        torch.testing.assert_close(rows.activations[hook].view(6, expect_rows, 16), expect, rtol=1e-5, atol=1e-5)
        assert rows.doc_ids.tolist() == [i for i in range(6) for _ in range(expect_rows)]
        assert rows.token_ids.tolist()[::expect_rows] == [it.label for it in pictures]
        positions = rows.positions.view(6, expect_rows)[0].tolist()
        assert positions == {"cls": [-1], "patches": list(range(16)), "both": [-1, *range(16)], "pooled": [-1]}[tokens]


def test_cnn_maps_become_location_rows_and_their_mean(cnn_folder, pictures):
    loaded = load_vision_model(str(cnn_folder), device="cpu")
    hook = "encoder.stages.1"
    maps = ImageHarvester(loaded, [hook], tokens="map", batch_images=8).run(pictures, pictures.items)
    pooled = ImageHarvester(loaded, [hook], tokens="pooled", batch_images=8).run(pictures, pictures.items)
    grid = ImageHarvester(loaded, [hook], tokens="map").describe()["grid"]
    cells = grid[0] * grid[1]
    assert maps.activations[hook].shape == (6 * cells, 16)
    torch.testing.assert_close(maps.activations[hook].view(6, cells, 16).mean(1), pooled.activations[hook])
    sites = {s.name: s for s in module_shapes(loaded)}
    assert sites[hook].layouts == "map, pooled, both" and len(sites[hook].shape) == 3
    with pytest.raises(HsaeError, match="feature map .* use --tokens map, pooled or both"):
        ImageHarvester(loaded, [hook], tokens="patches")
    with pytest.raises(HsaeError, match="different rows per image"):  # an 8 x 8 and a 4 x 4 map
        ImageHarvester(loaded, ["encoder.stages.0", hook], tokens="map")


def test_layouts_that_do_not_apply_are_refused_with_the_ones_that_do():
    with pytest.raises(HsaeError, match="one vector per image .* no patch grid .* --tokens pooled"):
        image_rows(torch.zeros(2, 8), "patches", "head", None)
    with pytest.raises(HsaeError, match="7 tokens that form no patch grid"):
        image_rows(torch.zeros(2, 7, 4), "patches", "blocks.3", None)
    with pytest.raises(HsaeError, match="no CLS token .* 4 x 4 grid"):
        image_rows(torch.zeros(2, 16, 4), "cls", "siglip.layer", None)
    rows, layout = image_rows(torch.zeros(2, 16, 4), "patches", "siglip.layer", None)
    assert layout.grid == (4, 4) and rows.shape == (2, 16, 4)


def test_bad_hooks_models_and_processors_are_clear_errors(vit_folder, tmp_path):
    loaded = load_vision_model(str(vit_folder), device="cpu")
    with pytest.raises(HsaeError, match="no module named 'layer.1' .*closest: layers.1"):
        ImageHarvester(loaded, ["layer.1"])
    with pytest.raises(HsaeError, match="no image_embeds"):
        ImageHarvester(loaded, ["image_embeds"])
    bare = tmp_path / "bare"
    for name in ("config.json", "model.safetensors"):
        bare.mkdir(exist_ok=True)
        (bare / name).write_bytes((vit_folder / name).read_bytes())
    with pytest.raises(HsaeError, match="no matching image processor .* preprocessor_config.json"):
        load_vision_model(str(bare), device="cpu")


def test_mixed_image_sizes_need_a_processor_that_resizes(vit_folder, tmp_path, pictures):
    loaded = load_vision_model(str(vit_folder), device="cpu")
    loaded.processor.do_resize = False
    with pytest.raises(HsaeError, match="mixed image sizes|do_resize"):
        loaded.pixel_values([pictures.open(it) for it in pictures])


def test_unreadable_images_are_named_skipped_and_counted_in_a_harvest(vit_folder, pictures, tmp_path):
    broken = Path(pictures.name) / "red" / "p3.png"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    loaded = load_vision_model(str(vit_folder), device="cpu")
    harvester = ImageHarvester(loaded, ["layers.1"], tokens="cls", batch_images=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = harvest_to_store(tmp_path / "store", harvester, pictures, tokens=rows_for(harvester, pictures))
    named = [str(w.message) for w in caught if issubclass(w.category, HsaeWarning)]
    assert len(named) == 1 and "red/p3.png" in named[0] and "cannot be decoded" in named[0]
    assert len(harvester.skipped) == 1 and store.total_rows == 5
    index = json.loads(write_image_index(tmp_path / "store", pictures).read_text())
    assert index["skipped"] == ["red/p3.png"]
    assert [r["harvested"] for r in index["images"]] == [True, True, True, True, False, True]  # blue/*, then red/*
    shard = store.read_shard(0)
    assert shard["doc_ids"].tolist() == [0, 1, 2, 3, 5] and shard["positions"].tolist() == [-1] * 5


def _tiny_bpe(path: Path) -> Path:
    merges = ["p i", "c t", "pi ct", "u r", "ur e</w>", "pict ure</w>"]
    path.write_bytes(gzip.compress(("#version: 0.2\n" + "\n".join(merges) + "\n").encode()))
    return path


def test_clip_bpe_tokenizer_from_a_merges_file(tmp_path):
    merges = read_merges(_tiny_bpe(tmp_path / "bpe.txt.gz"))
    assert merges[-1] == "pict ure</w>" and len(byte_symbols()) == len(set(byte_symbols())) == 256
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer_files(merges, tmp_path / "tok")))
    assert len(tok) == 512 + len(merges) + 2
    ids = tok("a picture")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "picture</w>", "<|endoftext|>"]
    with pytest.raises(HsaeError, match="not a CLIP BPE file"):
        read_merges(tmp_path / "missing.gz")


def test_clip_image_and_text_embeddings_share_rows_in_one_store(tmp_path, pictures, monkeypatch):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    monkeypatch.setenv("HSAE_HOME", str(tmp_path / "home"))
    bpe = _tiny_bpe(tmp_path / "bpe.txt.gz")
    vocab = 512 + len(read_merges(bpe)) + 2
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "clip"
    CLIPModel(config).save_pretrained(folder)
    try:
        from transformers import CLIPImageProcessorPil as ClipProcessor
    except ImportError:
        ClipProcessor = CLIPImageProcessor
    ClipProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    loaded = load_vision_model(str(folder), device="cpu", clip_bpe=bpe)
    harvester = ImageHarvester(loaded, ["image_embeds", "text_embeds"], batch_images=4)
    store = harvest_to_store(tmp_path / "store", harvester, pictures, tokens=6)
    assert store.hooks == ["image_embeds", "text_embeds"] and store.total_rows == 6
    pixels = loaded.pixel_values([Image.open(Path(pictures.name) / it.name).convert("RGB") for it in pictures])
    with torch.no_grad():
        image_ref = loaded.model.get_image_features(pixel_values=pixels)
        image_ref = image_ref if isinstance(image_ref, torch.Tensor) else image_ref.pooler_output
    text_ref = loaded.text_features([it.caption for it in pictures])
    tensors = ActivationStore.open(tmp_path / "store", hook="text_embeds").read_shard(0)
    torch.testing.assert_close(tensors["activations"], text_ref, rtol=1e-5, atol=1e-5)
    images_store = ActivationStore.open(tmp_path / "store", hook="image_embeds").read_shard(0)["activations"]
    padded = ImageHarvester(loaded, ["image_embeds"], pad_square=True).run(pictures, pictures.items)
    torch.testing.assert_close(images_store, padded.activations["image_embeds"], rtol=1e-5, atol=1e-5)
    unpadded = ImageHarvester(loaded, ["image_embeds"], pad_square=False).run(pictures, pictures.items)
    torch.testing.assert_close(unpadded.activations["image_embeds"], image_ref, rtol=1e-5, atol=1e-5)
    names = {s.name for s in module_shapes(loaded)}
    assert {"image_embeds", "text_embeds", "visual_projection"} <= names


# --- the embedded EfficientNet-Lite0 on TuxPaint stamps ----------------------------------------

needs_stamps = pytest.mark.skipif(
    not TUXPAINT_STAMPS.is_dir(), reason="Debian's tuxpaint-stamps-default (scripts/setup.sh installs it)"
)
needs_efficientnet = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite_pytorch") is None,
    reason="the vision extra (scripts/setup.sh installs it)",
)


@needs_stamps
@needs_efficientnet
def test_efficientnet_pooled_map_is_its_head_input_and_the_head_names_imagenet_classes():
    from hsae.sources.images import tuxpaint_stamps

    loaded = load_vision_model(None, device="cpu", image_size=96)
    stamps = tuxpaint_stamps().head(4)
    fc_input = ImageHarvester(loaded, ["_fc:input"]).run(stamps, stamps.items).activations["_fc:input"]
    pooled = ImageHarvester(loaded, ["_avg_pooling:input"], tokens="pooled").run(stamps, stamps.items)
    torch.testing.assert_close(pooled.activations["_avg_pooling:input"], fc_input)
    assert fc_input.shape == (4, 1280) and len(loaded.classes) == 1000 and loaded.classes[0] == "tench"
    assert loaded.classify(fc_input).shape == (4, 1000)
    sites = {s.name for s in module_shapes(loaded)}
    assert {"_fc:input", "_avg_pooling:input", "_conv_head"} <= sites and "_swish" not in sites  # runs 17 times


# The harvest CLI in a child process that pauses after each shard, so the test can kill it mid-way.
SLOW_HARVEST = """
import sys, time
import hsae.sources.harvest
real_write = hsae.sources.harvest.write_safetensors
def slow_write(*args, **kwargs):
    real_write(*args, **kwargs)
    time.sleep(0.5)
hsae.sources.harvest.write_safetensors = slow_write
from hsae.cli import main
sys.exit(main(sys.argv[1:]))
"""


@needs_stamps
@needs_efficientnet
@pytest.mark.slow
def test_efficientnet_harvest_of_stamps_killed_and_resumed_gives_identical_shards(tmp_path):
    from hsae.cli import main

    args = ["harvest-images", "--images", "tuxpaint", "--first", "48", "--batch-images", "8", "--image-size", "64",
            "--hook", "_avg_pooling:input", "--tokens", "map", "--shard-rows", "40", "-q"]  # fmt: skip
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_HARVEST, *args, "--out", str(killed)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            manifest = killed / "manifest.json"
            if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 2:
                break
            time.sleep(0.05)
        assert child.poll() is None, f"the harvest ended before it could be killed: {child.stderr.read()}"
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    partial = json.loads((killed / "manifest.json").read_text())
    assert partial["status"] == "harvesting" and 2 <= len(partial["shards"]) < 5
    assert main([*args, "--out", str(killed)]) == 0
    reference = tmp_path / "reference"
    assert main([*args, "--out", str(reference)]) == 0
    resumed, uninterrupted = ActivationStore.open(killed), ActivationStore.open(reference)
    assert resumed.total_rows == uninterrupted.total_rows == 48 * 4  # a 2 x 2 map per 64-pixel image
    assert resumed.manifest["shards"] == uninterrupted.manifest["shards"]  # same files, same sha256
    for a, b in zip(resumed.iter_shards(), uninterrupted.iter_shards(), strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert resumed.manifest["harvest"]["grid"] == [2, 2]
    index = json.loads((killed / "images.json").read_text())
    assert len(index["images"]) == 48 and index["skipped"] == []
