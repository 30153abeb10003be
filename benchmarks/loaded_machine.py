"""Training speed on a loaded machine: a tiny TopK SAE (d 96, 512 latents, k 4, batch 1024) with 0, 1
and 4 other CPU-bound processes running, under OpenMP's spin-waiting (`OMP_WAIT_POLICY=ACTIVE`, what
hsae did before hsae.runtime), passive waiting on every usable CPU, hsae's default (passive waiting,
threads = the usable CPUs other runnable processes leave idle), and one thread.

    python benchmarks/loaded_machine.py                 # the table
    python benchmarks/loaded_machine.py --steps 400     # longer runs

Each measurement is a fresh process (the wait policy is read when OpenMP starts); the competitors
are plain Python busy loops, one CPU each. Run it on an otherwise quiet machine: the competitors are
the only load it should see.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKER = """
import json, sys, time, torch
import hsae  # sets the wait policy (unless the environment chose one) and the thread count
from hsae.config import TrainConfig
from hsae.models import StepContext, get_family
from hsae.sources.synthetic import SyntheticConfig, SyntheticSource

steps = int(sys.argv[1])
source = SyntheticSource(SyntheticConfig(d_in=96, n_roots=40, seed=0))
batches = source.batches(1024)
pool = [next(batches) for _ in range(16)]
fam = get_family("topk")
model = fam(fam.config_class(arch="topk", d_in=96, n_latents=512, k=4)).train()
opt = torch.optim.Adam(model.parameters(), lr=TrainConfig().resolved_lr(512), fused=True)

def step(i):
    opt.zero_grad(set_to_none=True)
    out = model.training_forward(pool[i % 16], StepContext(step=i, total_steps=steps))
    out.loss.backward()
    model.remove_parallel_decoder_grad()
    opt.step()
    model.normalize_decoder()

for i in range(10):
    step(i)
start = time.perf_counter()
for i in range(steps):
    step(i)
seconds = time.perf_counter() - start
print(json.dumps({"tokens_per_s": steps * 1024 / seconds, "threads": torch.get_num_threads()}))
"""

BUSY = "while True:\n    pass\n"


def measure(env: dict[str, str], competitors: int, steps: int) -> dict:
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(competitors)]
    try:
        time.sleep(0.5 if competitors else 0)
        run = subprocess.run(
            [sys.executable, "-c", WORKER, str(steps)], env=env, capture_output=True, text=True, check=True
        )
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--competitors", default="0,1,4", help="comma list of competing busy processes")
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    from hsae.runtime import usable_cpus

    every_cpu = str(usable_cpus())
    setups = {
        "spin-waiting (before)": {**base, "OMP_WAIT_POLICY": "ACTIVE", "HSAE_THREADS": every_cpu},
        "passive, every usable CPU": {**base, "HSAE_THREADS": every_cpu},
        "hsae default (passive, idle CPUs)": base,
        "one thread": {**base, "HSAE_THREADS": "1"},
    }
    competitors = [int(c) for c in args.competitors.split(",")]
    results = {(name, c): measure(env, c, args.steps) for c in competitors for name, env in setups.items()}
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tiny TopK SAE, {args.steps} steps of 1024 tokens: tokens/s (vs quiet spin-waiting)")
    table.add_column("setup")
    for c in competitors:
        table.add_column(f"{c} busy", justify="right")
    quiet = results[("spin-waiting (before)", competitors[0])]["tokens_per_s"]
    for name in setups:
        cells = []
        for c in competitors:
            tps = results[(name, c)]["tokens_per_s"]
            cells.append(f"{tps:,.0f} ({tps / quiet:.2f}x, {results[(name, c)]['threads']} thr)")
        table.add_row(name, *cells)
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
