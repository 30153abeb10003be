"""MP-SAE encoders: the Gram-matrix form against the naive residual loop.

    python benchmarks/mp_gram.py [--n 1024] [--d 768] [--m 4096] [--k 32] [--repeats 3] [--threads T]

Both run k steps of matching pursuit on the same dictionary and batch (float32, inference, no grad).
"naive" recomputes the correlations W r with a matmul every step (O(n m d) per step); "gram" updates
them with rows of G = W W^T (O(n m) per step). Timings are the best of `--repeats`; the Gram form is
reported both with G cached (inference, as MPSAE does in eval mode) and with G rebuilt per call
(training, where W changes every step). Equality: the selected atoms and coefficients of both, and
a float64 run where they must agree exactly up to rounding.

Both encoders pick atoms with `hsae.models.mp.argmax_rows` (a blocked argmax, equal to torch's
argmax; torch's own argmax over 4096-wide rows took 6.7 of the ~10 ms of a Gram step at n = 1024 on
one core), so the comparison is of the correlation updates alone. The Gram encoder runs in row
chunks that keep the correlations in cache (hsae.models.mp.GRAM_CHUNK_ELEMENTS).
Measured (1 thread, this 2-core machine, shared; best of 3): n=1024: naive 1.14 s, Gram cached 0.19 s
(6.2x), Gram with G built per call 0.35 s (3.3x); n=4096: naive 5.66 s, cached 0.71 s (8.0x), built
per call 0.88 s (6.4x). Before (torch argmax, no chunks): 4.1x / 2.6x at n=1024, 4.9x / 4.3x at n=4096.
"""

from __future__ import annotations

import argparse
import time

import torch

from hsae.models.mp import mp_gram, mp_naive


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    W = torch.randn(args.m, args.d, generator=g)
    W /= W.norm(dim=1, keepdim=True)
    # inputs that are sparse combinations of atoms plus noise, like SAE inputs
    idx = torch.randint(0, args.m, (args.n, args.k), generator=g)
    x = (torch.rand(args.n, args.k, generator=g)[..., None] * W[idx]).sum(1) + 0.05 * torch.randn(
        args.n, args.d, generator=g
    )

    with torch.no_grad():
        G = W @ W.T
        t_naive = best_time(lambda: mp_naive(x, W, args.k), args.repeats)
        t_gram = best_time(lambda: mp_gram(x, W, args.k, G=G), args.repeats)
        t_gram_build = best_time(lambda: mp_gram(x, W, args.k), args.repeats)
        i_n, v_n, _ = mp_naive(x, W, args.k)
        i_g, v_g = mp_gram(x, W, args.k, G=G)
        same_idx = float((i_n == i_g).float().mean())
        max_dv = float((v_n - v_g).abs().max())
        Wd, xd = W.double(), x.double()
        i_nd, v_nd, _ = mp_naive(xd, Wd, args.k)
        i_gd, v_gd = mp_gram(xd, Wd, args.k)
        same_idx64 = float((i_nd == i_gd).float().mean())
        max_dv64 = float((v_nd - v_gd).abs().max())

    print(f"MP-SAE encode: n={args.n} d={args.d} m={args.m} k={args.k}, float32, {torch.get_num_threads()} threads")
    print(f"{'encoder':<28}{'seconds':>10}{'speed-up':>10}")
    print(f"{'naive (matmul per step)':<28}{t_naive:>10.4f}{1.0:>10.1f}")
    print(f"{'gram, G cached':<28}{t_gram:>10.4f}{t_naive / t_gram:>10.1f}")
    print(f"{'gram, G built per call':<28}{t_gram_build:>10.4f}{t_naive / t_gram_build:>10.1f}")
    print(f"equal outputs, float32: same atoms {same_idx:.4%}, max |coef diff| {max_dv:.2e}")
    print(f"equal outputs, float64: same atoms {same_idx64:.4%}, max |coef diff| {max_dv64:.2e}")


if __name__ == "__main__":
    main()
