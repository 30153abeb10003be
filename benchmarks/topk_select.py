"""Per-row top-k of a pre-activation chunk on the CPU: torch.topk, the two-stage torch ops and the
compiled kernel (hsae.models.sparse.cpu_select), in one process on the same data.

    python benchmarks/topk_select.py [--rows 512] [--latents 6144] [--k 32] [--threads T] [--repeats 30]

The chunk is what the TopK training step selects from (`selection.encode_topk_chunked`: 512 rows of
pre-activations at a time). Rows are Gaussian with a per-latent scale and offset, like a trained
encoder's pre-activations. Each figure is the median of `--repeats` calls; ratios are against
torch.topk in the same run. The results are checked equal (the same selected values per row).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from hsae.models.sparse import cpu_select
from hsae.models.sparse.selection import topk_select


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--latents", type=int, default=6144)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m = args.latents
    pre = torch.randn(args.rows, m) * torch.rand(m).mul(2) + torch.randn(m)
    k = args.k

    ways = {
        "torch.topk": lambda: pre.topk(k, dim=-1, sorted=False),
        "two-stage torch ops": lambda: topk_select(pre, k, compiled=False),
    }
    if cpu_select.enabled():
        ways["compiled (numba)"] = lambda: topk_select(pre, k, compiled=True)
    else:
        print("compiled kernel not measured: numba is not importable or HSAE_NUMBA=0")

    ref = pre.topk(k, dim=-1).values.relu().sort(-1).values
    for name, fn in ways.items():
        vals = fn()[0].relu().sort(-1).values
        if not torch.equal(vals, ref):
            raise SystemExit(f"{name} selected other values than torch.topk")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; chunk {args.rows} x {m}, k={k}")
    times = {name: median_ms(fn, args.repeats) for name, fn in ways.items()}
    table = Table(title="per-row top-k of one chunk (median ms)")
    for col in ("selection", "ms", "vs torch.topk", "ns per row"):
        table.add_column(col, justify="left" if col == "selection" else "right")
    base = times["torch.topk"]
    for name, ms in times.items():
        table.add_row(name, f"{ms:.2f}", f"{base / ms:.2f}x", f"{1e6 * ms / args.rows:,.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
