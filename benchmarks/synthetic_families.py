"""Train every SAE family on the synthetic forest and report what it recovers.

    python benchmarks/synthetic_families.py [--steps 3000] [--families topk,batchtopk] [--batch-size 1024]

Defaults follow issue 2: d_in=96, ~200 true features (40 roots x 4 children), 512 latents, k=4,
3000 steps. Penalty families (relu, jumprelu) take k as their L0 target. Metrics on a held-out sample
of 16384 rows: FVU, L0, fraction of true features recovered (best decoder cosine >= 0.9), mean best
cosine.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from hsae.config import TrainConfig
from hsae.eval.core import fvu, mean_l0
from hsae.eval.groundtruth import mean_best_cosine, recovered_fraction
from hsae.models import families, get_family
from hsae.sources.synthetic import SyntheticConfig, SyntheticSource
from hsae.train import Trainer


def run_family(name: str, source: SyntheticSource, args: argparse.Namespace) -> dict:
    family = get_family(name)
    sae_cfg = family.config_class(arch=name, d_in=source.d_in, n_latents=args.n_latents, k=args.k)
    sae_cfg.validate()
    train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                            checkpoint_every=args.steps, log_every=max(1, args.steps // 10),
                            dead_window_tokens=args.dead_window)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        model = Trainer(sae_cfg, train_cfg, source, out, show_progress=False).run()
        seconds = time.perf_counter() - t0
    held_out = source.sample_with_truth(16384)
    with torch.no_grad():
        codes = model.encode(held_out.x)
        x_hat = model.decode(codes)
    truth = source.forest.directions
    return {
        "family": name, "fvu": fvu(held_out.x, x_hat), "l0": mean_l0(codes),
        "recovered": recovered_fraction(model.W_dec, truth), "mean_cos": mean_best_cosine(model.W_dec, truth),
        "seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="relu,topk,batchtopk,jumprelu")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--n-latents", type=int, default=512)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dead-window", type=int, default=200_000)
    args = p.parse_args()
    names = list(families()) if args.families == "all" else args.families.split(",")
    source = SyntheticSource(SyntheticConfig(seed=args.seed))
    print(f"synthetic forest: d_in {source.d_in}, {source.forest.n_features} true features; "
          f"{args.n_latents} latents, k={args.k}, {args.steps} steps x {args.batch_size}")
    rows = [run_family(name, source, args) for name in names]
    print(f"{'family':<12}{'FVU':>8}{'L0':>7}{'recovered':>11}{'mean cos':>10}{'seconds':>9}")
    for r in rows:
        print(f"{r['family']:<12}{r['fvu']:>8.4f}{r['l0']:>7.2f}{r['recovered']:>11.3f}{r['mean_cos']:>10.3f}"
              f"{r['seconds']:>9.1f}")


if __name__ == "__main__":
    main()
