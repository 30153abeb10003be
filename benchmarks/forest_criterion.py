"""Which post-hoc forest criterion (hsae.interpret.forest.ForestOptions) recovers true edges, and
which agrees with WordNet: the measurements behind its defaults (docs/hierarchy.md).

    python benchmarks/forest_criterion.py [--synthetic-only] [--demo runs/demo] [--seeds 1,2,3]

Synthetic: flat TopK and Matryoshka SAEs trained on two of hsae's synthetic forests (the claim
forest of tests/test_hierarchical.py: 8 roots x 3 children in d=32, 64 latents, k=2, 300 steps;
and benchmarks/synthetic_families.py's: 40 roots x 4 children in d=96, 512 latents, k=4, 1500
steps), over training seeds; for each criterion, edge precision / recall / F1 of the extracted
forest against the true one (hsae.eval.hierarchy.edge_scores; co-occurrence on 8192 rows of a
sample the scores are not computed on), averaged over the seeds.

WordNet: for a MiniLM SAE trained by `hsae demo --out DIR` (DIR/topk and its store DIR/store), the
forest extracted on `--rows` store rows under each criterion and its `hsae eval` WordNet section:
alignment of the forest's edges with WordNet's hypernyms, against random edges (lift), and how
dense the densest parent is.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from hsae.config import TrainConfig
from hsae.eval.hierarchy import edge_scores, latent_of_features
from hsae.interpret.forest import ForestOptions, coactivation, forest_from_coactivation
from hsae.models import get_family
from hsae.sources.synthetic import SyntheticConfig, SyntheticSource
from hsae.train import Trainer

BASE = ForestOptions(min_coverage=0.6, min_lift=0.0, max_parent_density=1.0, rank="coverage")
# name -> the criterion (the first is what extraction did before issue 16)
CRITERIA: dict[str, ForestOptions] = {
    "coverage>=0.6 (before)": BASE,
    **{f"coverage>=0.6, density<={d}": replace(BASE, max_parent_density=d) for d in (0.05, 0.1, 0.2)},
    **{f"coverage>=0.6, lift>={lift}": replace(BASE, min_lift=lift) for lift in (1.5, 2.0, 3.0, 5.0)},
    **{
        f"coverage>={c}, lift>={lift}, rank {r}": replace(BASE, min_coverage=c, min_lift=lift, rank=r)
        for c in (0.3, 0.4, 0.5)
        for lift in (2.0, 3.0)
        for r in ("coverage", "lift")
    },
}

FORESTS = {
    "claim": (
        SyntheticConfig(d_in=32, n_roots=8, branching=3, p_root=0.15, p_child=0.9, seed=0),
        64,
        2,
        300,
    ),
    "benchmark": (SyntheticConfig(seed=0), 512, 4, 1500),
}
FAMILIES = {"topk": {}, "matryoshka": {"group_fractions": [0.25, 0.75]}}


def synthetic_table(seeds: list[int], forests: list[str]) -> None:
    for fname in forests:
        data, n, k, steps = FORESTS[fname]
        source = SyntheticSource(data)
        sample = source.sample_with_truth(8192, stream=-2).x
        for arch, opts in FAMILIES.items():
            scores: dict[str, list[tuple[float, float, float]]] = {c: [] for c in CRITERIA}
            for seed in seeds:
                fam = get_family(arch)
                cfg = fam.config_class(arch=arch, d_in=data.d_in, n_latents=n, k=k, **opts)
                train = TrainConfig(
                    steps=steps, batch_size=256, lr=3e-3, lr_warmup_steps=20, seed=seed,
                    checkpoint_every=10**6, log_every=10**6, dead_window_tokens=5120,
                )  # fmt: skip
                with tempfile.TemporaryDirectory() as out:
                    model = Trainer(cfg, train, source, out, show_progress=False).run()
                counts, co = coactivation(model, sample)
                dec = model.W_dec.detach().float()
                lat = latent_of_features(dec, source.forest.directions)
                for cname, opt in CRITERIA.items():
                    found = forest_from_coactivation(counts, co, sample.shape[0], dec, opt)
                    es = edge_scores(found.parents, source.forest.parents, lat)
                    scores[cname].append((es.precision, es.recall, es.f1))
            shape = f"{data.n_roots} roots x {data.branching} children in d={data.d_in}"
            print(f"\n{fname} forest ({shape}), {arch} (n {n}, k {k}, {steps} steps), mean over seeds {seeds}")
            print(f"{'criterion':<42}{'P':>7}{'R':>7}{'F1':>7}")
            for cname, rows in scores.items():
                p, r, f = (sum(v[i] for v in rows) / len(rows) for i in range(3))
                print(f"{cname:<42}{p:>7.3f}{r:>7.3f}{f:>7.3f}", flush=True)


def wordnet_table(demo: Path, rows: int) -> None:
    import hsae
    from hsae.eval.run import evaluate
    from hsae.store import ActivationStore

    model_dir = demo / "topk"
    model = hsae.load(model_dir)
    store = ActivationStore.open(demo / "store")
    x = store.sample(rows)
    counts, co = coactivation(model, x)
    dec = model.W_dec.detach().float()
    print(f"\nMiniLM + WordNet ({model_dir}, {model.n_latents} latents, k {model.config.k}; forests on {rows} rows)")
    print(
        f"{'criterion':<42}{'edges':>7}{'roots':>7}{'max P(parent)':>14}{'its kids':>9}{'max kids':>9}"
        f"{'aligned':>9}{'random':>8}{'lift':>7}"
    )
    for cname, opt in CRITERIA.items():
        found = forest_from_coactivation(counts, co, x.shape[0], dec, opt)
        parents = found.parents
        model.set_hierarchy(parents)
        has = parents >= 0
        dens = counts.float() / x.shape[0]
        kids = torch.bincount(parents[has], minlength=parents.numel())
        densest = int(torch.where(kids > 0, dens, torch.full_like(dens, -1.0)).argmax())
        top = float(dens[densest]) if has.any() else float("nan")
        n_roots = int(torch.unique(parents[has]).numel())
        shape = f"{int(has.sum()):>7}{n_roots:>7}{top:>14.3f}{int(kids[densest]):>9}{int(kids.max()):>9}"
        section = evaluate(model, store, model_dir=model_dir, tokens=256, only=["wordnet"]).sections[0]
        if section.skipped:
            print(f"{cname:<42}{shape}  skipped: {section.skipped}", flush=True)
            continue
        m = section.metrics
        print(
            f"{cname:<42}{shape}{m['edge_alignment']:>9.3f}{m['random_alignment']:>8.3f}{m['lift']:>7.2f}", flush=True
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--demo", type=Path, default=None, help="a folder written by `hsae demo --out`")
    p.add_argument("--rows", type=int, default=32768, help="store rows the MiniLM forests are extracted on")
    p.add_argument("--forests", default=",".join(FORESTS), help=f"some of {', '.join(FORESTS)}")
    p.add_argument("--synthetic-only", action="store_true")
    p.add_argument("--wordnet-only", action="store_true")
    args = p.parse_args()
    if not args.wordnet_only:
        synthetic_table([int(s) for s in args.seeds.split(",")], args.forests.split(","))
    if args.demo is not None and not args.synthetic_only:
        wordnet_table(args.demo, args.rows)


if __name__ == "__main__":
    main()
