"""One MSAE read at each k against TopK SAEs trained separately at those k (the MSAE paper's claim:
one model on or beyond the TopK frontier).

    python benchmarks/msae_frontier.py [--data tuxpaint-map,tuxpaint-pooled,minilm] [--ks 8,16,32,64]
        [--n-latents 1024] [--steps 300] [--batch-size 512] [--threads 2] [--out runs/msae_frontier]

Data (harvested once into --out, resumable; nothing downloaded):
  tuxpaint-map     EfficientNet-Lite0's last feature map (1280 channels, 7 x 7 per image) on the 796
                   TuxPaint stamps: one row per location, 39,004 rows
  tuxpaint-pooled  its pooled image embedding (the ImageNet head's input), one row per stamp: 796 rows
  minilm           all-MiniLM-L6-v2 encoder.layer.3 on WordNet glosses, --minilm-rows tokens (384 wide)
Every 10th image (document) is held out; the metrics are on the held-out rows: FVU, cosine and CKNNA
of the reconstruction (hsae.eval.over_k; CKNNA per batch of 4096, 10 neighbours). The MSAE's nesting
is --ks (weighting uw unless --weighting); every model has the same width, steps, batch, learning
rate, seed and AuxK weight (--aux-coef, TopK's default 1/32 for both; the paper's MSAE has none).
Training cost: CPU seconds of this process (less sensitive than wall time to other
work on a shared machine) and wall seconds, per model, and the MSAE's against the sum of the TopK
runs. The last line says, per data set and k, whether the MSAE is beyond (FVU below), on (within 2%
above) or behind the TopK trained at that k.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hsae.config import TrainConfig, from_dict  # noqa: E402
from hsae.eval.over_k import evaluate_over_k  # noqa: E402
from hsae.models import get_family  # noqa: E402
from hsae.sources.files import ArrayActivations  # noqa: E402
from hsae.train import Trainer  # noqa: E402

HELDOUT_EVERY = 10
ON_FRONTIER = 1.02  # MSAE's FVU at k within 2% of TopK(k)'s counts as on the frontier


def _image_rows(out: Path, hook: str, tokens: str) -> tuple[torch.Tensor, torch.Tensor]:
    from hsae.sources.harvest import harvest_to_store
    from hsae.sources.images import tuxpaint_stamps
    from hsae.sources.vision import ImageHarvester, load_vision_model, rows_for
    from hsae.store import ActivationStore

    store_dir = out / f"store-{hook.replace(':', '-')}-{tokens}"
    images = tuxpaint_stamps()
    harvester = ImageHarvester(load_vision_model(device="cpu"), [hook], tokens=tokens)
    harvest_to_store(store_dir, harvester, images, tokens=rows_for(harvester, images))
    store = ActivationStore.open(store_dir, max_norm_ratio=None)
    shards = list(store.iter_shards())
    return torch.cat([s["activations"] for s in shards]), torch.cat([s["doc_ids"] for s in shards])


def _minilm_rows(out: Path, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    from hsae.sources.harvest import harvest_to_store
    from hsae.sources.hf import Harvester, load_model
    from hsae.sources.text import open_corpus
    from hsae.store import ActivationStore

    store_dir = out / "store-minilm-layer3"
    harvester = Harvester(load_model(device="cpu"), ["encoder.layer.3"])
    harvest_to_store(store_dir, harvester, open_corpus("wordnet"), tokens=rows)
    shards = list(ActivationStore.open(store_dir, max_norm_ratio=None).iter_shards())
    return torch.cat([s["activations"] for s in shards]), torch.cat([s["doc_ids"] for s in shards])


def load_data(name: str, out: Path, minilm_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out rows): every HELDOUT_EVERY-th image or document is held out."""
    if name == "tuxpaint-map":
        rows, docs = _image_rows(out, "_avg_pooling:input", "map")
    elif name == "tuxpaint-pooled":
        rows, docs = _image_rows(out, "_fc:input", "pooled")
    elif name == "minilm":
        rows, docs = _minilm_rows(out, minilm_rows)
    else:
        raise SystemExit(f"unknown data set {name!r}: tuxpaint-map, tuxpaint-pooled or minilm")
    held = docs % HELDOUT_EVERY == HELDOUT_EVERY - 1
    return rows[~held], rows[held]


def train(arch: str, options: dict, d_in: int, args, train_rows: torch.Tensor, out: Path):
    """A trained model and its (CPU seconds, wall seconds); a finished run in `out` is reused."""
    cfg = from_dict(get_family(arch).config_class, dict(arch=arch, d_in=d_in, n_latents=args.n_latents, **options))
    tc = TrainConfig(
        steps=args.steps,
        batch_size=min(args.batch_size, train_rows.shape[0]),
        seed=args.seed,
        log_every=max(1, args.steps // 5),
        checkpoint_every=args.steps,
        dead_window_tokens=args.dead_window,
    )
    timing = out / "timing.json"
    cpu0, wall0 = time.process_time(), time.perf_counter()
    model = Trainer(cfg, tc, ArrayActivations(train_rows, seed=args.seed), out, resume=True, show_progress=False).run()
    cost = (time.process_time() - cpu0, time.perf_counter() - wall0)
    if timing.is_file():
        cost = tuple(json.loads(timing.read_text()))
    else:
        timing.write_text(json.dumps(cost))
    return model, cost


def run(name: str, args) -> dict:
    out = Path(args.out)
    train_rows, held = load_data(name, out, args.minilm_rows)
    ks = [int(k) for k in args.ks.split(",")]
    print(f"\n{name}: {train_rows.shape[0]} training rows, {held.shape[0]} held out, width {train_rows.shape[1]}")
    options = dict(k=ks[-1], nesting=ks, weighting=args.weighting, aux_coef=args.aux_coef)
    folder = "msae" if args.weighting == "uw" else f"msae-{args.weighting.replace(',', '-')}"
    msae, msae_cost = train("msae", options, train_rows.shape[1], args, train_rows, out / name / folder)
    msae_rows = {r["k"]: r for r in evaluate_over_k(msae, held, ks)}
    topk_rows, topk_costs = {}, {}
    for k in ks:
        options = dict(k=k, aux_coef=args.aux_coef)
        model, cost = train("topk", options, train_rows.shape[1], args, train_rows, out / name / f"topk-{k}")
        topk_rows[k] = evaluate_over_k(model, held, [k])[0]
        topk_costs[k] = cost
    print("| k | MSAE FVU | TopK(k) FVU | MSAE cosine | TopK cosine | MSAE CKNNA | TopK CKNNA | TopK(k) CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for k in ks:
        m, t = msae_rows[k], topk_rows[k]
        print(f"| {k} | {m['fvu']:.4f} | {t['fvu']:.4f} | {m['cosine']:.4f} | {t['cosine']:.4f} | "
              f"{m['cknna_recon']:.4f} | {t['cknna_recon']:.4f} | {topk_costs[k][0]:.0f} |")  # fmt: skip
    topk_cpu = sum(c[0] for c in topk_costs.values())
    topk_wall = sum(c[1] for c in topk_costs.values())
    print(f"training: one MSAE {msae_cost[0]:.0f} CPU s ({msae_cost[1]:.0f} wall s); the {len(ks)} TopK runs "
          f"{topk_cpu:.0f} CPU s ({topk_wall:.0f} wall s): {msae_cost[0] / topk_cpu:.2f}x")  # fmt: skip
    ratios = {k: msae_rows[k]["fvu"] / topk_rows[k]["fvu"] for k in ks}
    where = {k: "beyond" if r < 1 else ("on" if r <= ON_FRONTIER else "behind") for k, r in ratios.items()}
    verdict = "on or beyond" if all(w != "behind" for w in where.values()) else "not everywhere on"
    listed = ", ".join(f"k={k}: {r:.3f} ({where[k]})" for k, r in ratios.items())
    print(f"{name}: MSAE FVU / TopK(k) FVU = {listed} -> MSAE is {verdict} the TopK frontier")
    return {"msae": msae_rows, "topk": topk_rows, "ratios": ratios, "where": where, "verdict": verdict}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="tuxpaint-map,tuxpaint-pooled,minilm")
    ap.add_argument("--ks", default="8,16,32,64")
    ap.add_argument("--n-latents", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--weighting", default="uw")
    ap.add_argument("--aux-coef", type=float, default=1 / 32, help="AuxK weight of both families (0: the paper's)")
    ap.add_argument("--dead-window", type=int, default=200_000, help="tokens without firing before AuxK applies")
    ap.add_argument("--minilm-rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/msae_frontier")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {name: run(name, args) for name in args.data.split(",")}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
