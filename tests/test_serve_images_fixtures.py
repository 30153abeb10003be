"""A tiny image model for the browser's image tests (not a test module; shared by test_serve_images.py
and test_browser.py). Built once per test process, in seconds:

- `image_model()`: 12 pictures, 40 x 24 (wider than tall, so the white padding shows), in three
  folders, each a colour with a dark block in one corner, captioned with markup in every caption; a
  random 1-layer ViT classifier (32 x 32 input, 4 x 4 patches) harvested with CLS and patch rows
  (`--tokens both`, padded to a square); a TopK SAE trained on the store (`hsae train --data STORE`);
  its concepts.json (`concept_report`, named through the head, heatmaps from the patch rows).
  Returns (store folder, model folder).
- `image_model_with_examples()`: a copy of that model without concepts.json and with an examples file
  instead (the examples pass over the store's rows, its token table named by the image labels from
  images.json: an image store's token ids are label ids).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from PIL import Image

from hsae.cli import main

_ROOT = Path(tempfile.mkdtemp(prefix="hsae-serve-images-"))
atexit.register(shutil.rmtree, _ROOT, True)
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
SIZE = (40, 24)
MARKUP = "<img src=x onerror=alert(1)>"  # in every caption: the page must show it as text


def picture(i: int) -> Image.Image:
    """Picture i: its folder's colour, a little lighter each time, with a dark 10 x 10 corner block."""
    colour = tuple(min(255, c + 3 * i) for c in list(COLOURS.values())[i % 3])
    image = Image.new("RGB", SIZE, colour)
    x = 0 if i % 2 == 0 else SIZE[0] - 10
    image.paste((20, 20, 20), (x, 0, x + 10, 10))
    return image


def tiny_vit(folder: Path) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    try:
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=4, id2label={i: f"class{i}" for i in range(4)})  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    Processor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@lru_cache(maxsize=1)
def image_model() -> tuple[Path, Path]:
    from hsae.atomic import write_json
    from hsae.cli.concepts import CONCEPTS_FILE, concept_report, read_image_store
    from hsae.sources.harvest import harvest_to_store
    from hsae.sources.images import image_folder
    from hsae.sources.vision import ImageHarvester, load_vision_model, rows_for, write_image_index

    pics = _ROOT / "pics"
    for i in range(12):
        folder = pics / list(COLOURS)[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        picture(i).save(folder / f"p{i:02d}.png")
        (folder / f"p{i:02d}.txt").write_text(f"a {folder.name} card number {i} {MARKUP}\n")
    loaded = load_vision_model(str(tiny_vit(_ROOT / "vit")), device="cpu")
    images = image_folder(pics)
    harvester = ImageHarvester(loaded, ["vit.layernorm"], tokens="both")
    store, model = _ROOT / "store", _ROOT / "sae"
    harvest_to_store(store, harvester, images, tokens=rows_for(harvester, images))
    write_image_index(store, images)
    # The window this model was tuned with (the threshold below names two of its latents).
    code = main(["train", "--arch", "topk", "--data", str(store), "--n-latents", "24", "--k", "4", "--steps", "40",
                 "--batch-size", "64", "-o", "dead_window_tokens=1000000", "-q", "--out", str(model)])  # fmt: skip
    assert code == 0, "hsae train on the image store failed"
    import hsae

    # threshold 0.3: two of the six firing latents are named, so named and unnamed concepts both show
    report = concept_report(hsae.load(model), read_image_store(store), loaded, n_top=6, threshold=0.3)
    write_json(model / CONCEPTS_FILE, report)
    return store, model


@lru_cache(maxsize=1)
def image_model_with_examples() -> tuple[Path, Path]:
    import hsae
    from hsae.interpret.examples import ExamplesConfig, build_examples
    from hsae.interpret.streams import StoreStream
    from hsae.store import ActivationStore

    store, model = image_model()
    copy = shutil.copytree(model, _ROOT / "sae-examples")
    (copy / "concepts.json").unlink()
    sae = hsae.load(copy)
    # an image store's token ids are its labels: the pass names them from images.json, no tokenizer
    stream = StoreStream(ActivationStore.open(store, max_norm_ratio=0))
    assert stream.label_names() == ["blue", "green", "red"]
    build_examples(sae, copy, stream, ExamplesConfig(random_contexts=16, batch_rows=256))
    return store, copy
