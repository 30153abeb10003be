"""The evaluation table of issue 5: several SAE families trained on the same MiniLM store, every
evaluator run on each, one row per family.

    python benchmarks/eval_table.py                                  # ~10 minutes on 2 CPU cores
    python benchmarks/eval_table.py --families topk,matryoshka --steps 500 --tokens 50000
    python benchmarks/eval_table.py --work /tmp/evaltable --keep      # reuse the store and models

Steps: harvest `--tokens` MiniLM activations (encoder.layer.3, WordNet glosses and examples) into a
store; train each family on it with the same n_latents, k, steps and batch size; give the flat
families (no built-in tree) the post-hoc forest of `hsae tree --save` (co-activation coverage plus
decoder cosine, on the evaluation sample); run `hsae.eval.run.evaluate` with every evaluator; print
one table. Columns: FVU, L0, dead latents (%), downstream embedding cosine and nearest-neighbour kept
(held-out WordNet sentences, spliced at the hook), mean full absorption on the first-letter task
(with the mean probe F1 of the letters it could judge), WordNet alignment of the forest's edges
against random edges, and the lift. Families that fail to build or train are reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

DEFAULT_FAMILIES = "topk,batchtopk,matryoshka,tree"
# Family options beyond the shared ones, sized for short CPU runs.
FAMILY_OPTIONS = {
    "h-sae": {"warmup_steps": 100, "m_low": 15},  # n_latents = n_top * (1 + m_low): 2048 = 128 * 16
    "forest": {"hierarchy_every": 200},
}


def harvest(store: Path, tokens: int) -> None:
    from hsae.sources.harvest import harvest_to_store
    from hsae.sources.hf import Harvester, load_model
    from hsae.sources.text import open_corpus
    from hsae.store import read_manifest

    manifest = read_manifest(store) if store.is_dir() else None
    if manifest and manifest.get("status") == "complete" and manifest.get("target_rows") == tokens:
        return
    loaded = load_model(device="cpu")
    harvest_to_store(
        store, Harvester(loaded, ["encoder.layer.3"]), open_corpus("wordnet"), tokens=tokens, shard_rows=32768
    )


def train_family(arch: str, store: Path, out: Path, args) -> None:
    from hsae.config import TrainConfig, from_dict
    from hsae.models import get_family
    from hsae.store import ActivationStore
    from hsae.train import train

    if (out / "config.json").is_file() and (out / "weights.safetensors").is_file():
        return
    if out.exists():
        shutil.rmtree(out)
    family = get_family(arch)
    options = {"arch": arch, "d_in": 384, "n_latents": args.n_latents, "k": args.k, **FAMILY_OPTIONS.get(arch, {})}
    sae_config = from_dict(family.config_class, options, what=f"{arch} config")
    sae_config.validate()
    train_config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        checkpoint_every=args.steps,
        log_every=max(1, args.steps // 10),
        lr_warmup_steps=min(100, args.steps // 10),
    )
    train(sae_config, train_config, ActivationStore.open(store), out, show_progress=False)


def fmt(value, spec=".3f") -> str:
    if value is None:
        return "skip"
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=DEFAULT_FAMILIES)
    parser.add_argument("--tokens", type=int, default=120_000, help="activation rows to harvest")
    parser.add_argument("--n-latents", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--sentences", type=int, default=256, help="held-out sentences for downstream fidelity")
    parser.add_argument("--nouns", type=int, default=4000, help="WordNet nouns for the alignment")
    parser.add_argument("--words", type=int, default=6000, help="single-token words for absorption")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the store and models (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    from hsae.eval.run import evaluate
    from hsae.interpret.forest import extract_forest, has_builtin_hierarchy
    from hsae.models import families, load
    from hsae.store import ActivationStore

    work = args.work or Path(tempfile.mkdtemp(prefix="hsae-eval-table-"))
    work.mkdir(parents=True, exist_ok=True)
    store_path = work / "store"
    t0 = time.time()
    harvest(store_path, args.tokens)
    print(f"store: {ActivationStore.open(store_path).total_rows} rows in {time.time() - t0:.0f}s", flush=True)
    known = families()
    options = {"sentences": args.sentences, "wordnet_nouns": args.nouns, "absorption_words": args.words}
    rows = []
    for arch in [f.strip() for f in args.families.split(",") if f.strip()]:
        if arch not in known:
            print(f"{arch}: not a known family ({', '.join(known)}), skipped", flush=True)
            continue
        out = work / arch
        t = time.time()
        try:
            train_family(arch, store_path, out, args)
        except Exception as err:  # a family still in progress elsewhere must not stop the table
            print(f"{arch}: training failed ({type(err).__name__}: {err}), skipped", flush=True)
            continue
        train_s = time.time() - t
        sae = load(out)
        source = ActivationStore.open(store_path, seed=1)
        forest = "built-in"
        if not has_builtin_hierarchy(sae):
            sae.set_hierarchy(extract_forest(sae, source.sample(args.eval_tokens)).parents)
            forest = "extracted"
        t = time.time()
        report = evaluate(sae, source, model_dir=out, tokens=args.eval_tokens, options=dict(options))
        eval_s = time.time() - t
        sections = {s.name: (None if s.skipped else s.metrics) for s in report.sections}
        skipped = {s.name: s.skipped for s in report.sections if s.skipped}
        core = sections.get("core") or {}
        down = sections.get("downstream") or {}
        absorb = sections.get("absorption") or {}
        wn = sections.get("wordnet") or {}
        row = {
            "family": arch,
            "forest": forest,
            "train_s": round(train_s, 1),
            "eval_s": round(eval_s, 1),
            "fvu": core.get("fvu"),
            "l0": core.get("l0"),
            "dead_pct": None if core.get("dead_fraction") is None else 100 * core["dead_fraction"],
            "emb_cosine": down.get("embedding_cosine"),
            "emb_cosine_zero": down.get("embedding_cosine_zero"),
            "nn_kept": down.get("nn_kept"),
            "self_retrieval": down.get("self_retrieval"),
            "absorption": absorb.get("mean_full_absorption"),
            "absorption_fraction": absorb.get("mean_absorption_fraction"),
            "probe_f1": absorb.get("mean_probe_f1"),
            "letters": absorb.get("letters_evaluated"),
            "wordnet_alignment": wn.get("edge_alignment"),
            "wordnet_random": wn.get("random_alignment"),
            "wordnet_lift": wn.get("lift"),
            "edges_scored": wn.get("edges_scored"),
            "skipped": skipped,
        }
        rows.append(row)
        print(
            f"{arch}: trained in {train_s:.0f}s, evaluated in {eval_s:.0f}s"
            + (f" (skipped: {skipped})" if skipped else ""),
            flush=True,
        )

    print()
    print(
        f"MiniLM all-MiniLM-L6-v2 encoder.layer.3 on WordNet: {args.tokens} tokens, n_latents {args.n_latents}, "
        f"k {args.k}, {args.steps} steps x {args.batch_size}; eval {args.eval_tokens} tokens, "
        f"{args.sentences} held-out sentences, {args.nouns} nouns"
    )
    header = [
        "family",
        "forest",
        "FVU",
        "L0",
        "dead %",
        "emb cos",
        "NN kept",
        "absorb",
        "abs frac",
        "probe F1",
        "WN align",
        "WN random",
        "lift",
        "edges",
    ]
    table = [
        [
            r["family"],
            r["forest"],
            fmt(r["fvu"]),
            fmt(r["l0"], ".1f"),
            fmt(r["dead_pct"], ".1f"),
            fmt(r["emb_cosine"]),
            fmt(r["nn_kept"]),
            fmt(r["absorption"]),
            fmt(r["absorption_fraction"]),
            fmt(r["probe_f1"], ".2f"),
            fmt(r["wordnet_alignment"]),
            fmt(r["wordnet_random"]),
            fmt(r["wordnet_lift"], ".2f"),
            fmt(r["edges_scored"], "d"),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(header)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)))
    print("-|-".join("-" * w for w in widths))
    for t in table:
        print(" | ".join(c.ljust(w) for c, w in zip(t, widths, strict=False)))
    if rows:
        print(f"\nzero-ablation embedding cosine: {fmt(rows[0]['emb_cosine_zero'])}; total {time.time() - t0:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.work is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
