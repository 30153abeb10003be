"""Training speed of the TopK-style families against a plain dense PyTorch TopK step and EleutherAI's
sparsify, in one process, on the same data (issue 6).

    python benchmarks/train_speed.py              # d_in=384, 6144 latents, k=32, batch 4096, fp32, Adam
    python benchmarks/train_speed.py --quick      # fewer steps
    python benchmarks/train_speed.py --families topk,dense --steps 20
    python benchmarks/train_speed.py --n-latents 16384,32768,65536 --k 32,64 --families sparsify,topk,topk-bf16

Every figure is for a full training step: forward, backward, decoder-gradient projection, Adam,
decoder renormalisation, dead-latent bookkeeping (AuxK switches on once latents are dead for
`--dead-window` tokens, for every family alike). The matmul limit is the machine's measured float32
rate for (batch x d_in) @ (d_in x n_latents): the tokens/s training would reach if a step cost exactly
that one matmul. Peak memory is measured with the PyTorch profiler's memory timeline over one step
(the tensors the step touches, pre-existing ones included, at the step's worst moment) and compared
with what parameters, Adam state and one batch need. Every loop zeroes gradients (set to None)
before its forward, so last step's gradients are not held through it. FVU is measured on a held-out
batch after the same number of steps on the same data (`--fvu-steps`, default 200: each family
trains on, untimed, after its timed steps), to show speed is not bought with a worse model.
eai-sparsify is measured when `import sparsify` works (it is not a dependency of hsae). `--device
cuda` runs it all on a GPU, timings synchronised with it and peak memory from CUDA's allocator.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hsae.config import TrainConfig
from hsae.eval.core import fvu
from hsae.models import StepContext, get_family
from hsae.models.base import init_b_dec_geometric_median, standard_input_scale
from hsae.models.codes import fire_counts
from hsae.models.sparse.selection import DEFAULT_CHUNK_ROWS
from hsae.models.sparse.steps import FusedTopKStep
from hsae.sources.synthetic import SyntheticConfig, SyntheticSource

D_IN, N_LATENTS, K, BATCH = 384, 6144, 32, 4096
DEVICE = torch.device("cpu")  # --device


def sync() -> None:
    """Wait for the GPU, so that wall-clock times cover the work (a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


# ----- the dense reference: what a plain PyTorch TopK SAE does -------------------------------------
class DenseTopK(torch.nn.Module):
    """Dense codes, dense decoder matmul, autograd everywhere; AuxK by masked top-k."""

    def __init__(self, d: int, m: int, k: int, aux_k: int):
        super().__init__()
        self.k, self.aux_k = k, aux_k
        w = torch.randn(m, d)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(m))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))

    def forward(self, xn: torch.Tensor, dead: torch.Tensor | None = None):
        pre = (xn - self.b_dec) @ self.W_enc + self.b_enc
        v, i = pre.topk(self.k, dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter(1, i, v.relu())
        xn_hat = z @ self.W_dec + self.b_dec
        loss = (xn_hat - xn).pow(2).sum(-1).mean()
        if dead is not None and dead.any():
            av, ai = pre.masked_fill(~dead, float("-inf")).topk(min(self.aux_k, int(dead.sum())), dim=-1, sorted=False)
            za = torch.zeros_like(pre).scatter(1, ai, av.relu())
            loss = loss + (za @ self.W_dec - (xn - xn_hat).detach()).pow(2).sum(-1).mean() / 32
        return xn_hat, z, loss


@dataclass
class Runner:
    name: str
    params: list[torch.Tensor]
    step: Callable[[torch.Tensor, int], None]  # (raw batch, step index)
    reconstruct: Callable[[torch.Tensor], torch.Tensor]  # raw -> raw, inference mode
    note: str = ""
    # bf16-screened runs: the fraction of chosen entries that an exact float32 selection also chooses
    agreement: Callable[[torch.Tensor], float] | None = None


def _adam(params, kind: str, lr: float) -> torch.optim.Adam:
    if kind == "fused":
        return torch.optim.Adam(params, lr=lr, fused=True)
    if kind == "foreach":
        return torch.optim.Adam(params, lr=lr, foreach=True)
    return torch.optim.Adam(params, lr=lr)


class DeadTracker:
    def __init__(self, m: int, window: int):
        self.since = torch.zeros(m, dtype=torch.long, device=DEVICE)
        self.window = window

    def mask(self) -> torch.Tensor:
        return self.since >= self.window

    def update(self, fired: torch.Tensor, n: int) -> None:
        self.since += n
        self.since[fired] = 0


def hsae_runner(
    arch: str, scale: float, b_dec: torch.Tensor, args, *, compute_dtype: str = "float32", name: str | None = None
) -> Runner:
    fam = get_family(arch)
    extra = {} if compute_dtype == "float32" else {"compute_dtype": compute_dtype}  # mp has no such option
    cfg = fam.config_class(arch=arch, d_in=D_IN, n_latents=N_LATENTS, k=K, input_scale=scale, **extra)
    cfg.validate()
    torch.manual_seed(0)
    model = fam.from_config(cfg).to(DEVICE)
    with torch.no_grad():
        model.b_dec.copy_(b_dec)
    model.train()
    opt = _adam(model.parameters(), args.adam, args.lr)
    dead = DeadTracker(N_LATENTS, args.dead_window)
    train_step = type(model).train_step  # what the trainer runs
    if isinstance(train_step, FusedTopKStep):
        train_step = dataclasses.replace(train_step, chunk_rows=args.chunk_rows)

    def step(x: torch.Tensor, i: int) -> None:
        ctx = StepContext(step=i, total_steps=args.total_steps, dead_mask=dead.mask())
        opt.zero_grad(set_to_none=True)  # before the forward: last step's gradients are not kept through it
        out = train_step(model, x, ctx)
        loss = out.loss
        out.x_hat = None  # as the trainer: the reconstruction is not held through the backward
        loss.backward()
        model.remove_parallel_decoder_grad()
        opt.step()
        model.normalize_decoder()
        model.after_step(out, ctx)
        dead.update(fire_counts(out.codes) > 0, x.shape[0])

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            x_hat = model(x).x_hat
        model.train()
        return x_hat

    def agreement(x: torch.Tensor) -> float:
        with torch.no_grad():
            xn = model.scale_in(x)
            chosen = model.screening_scores(xn).topk(K, dim=-1).indices.sort(-1).values
            exact = model.pre_activations(xn).topk(K, dim=-1).indices.sort(-1).values
        same = (chosen[:, :, None] == exact[:, None, :]).any(-1)
        return float(same.float().mean())

    screened = compute_dtype != "float32"
    return Runner(name or arch, list(model.parameters()), step, reconstruct, agreement=agreement if screened else None)


def dense_runner(scale: float, b_dec: torch.Tensor, args) -> Runner:
    torch.manual_seed(0)
    model = DenseTopK(D_IN, N_LATENTS, K, aux_k=D_IN // 2).to(DEVICE)
    with torch.no_grad():
        model.b_dec.copy_(b_dec)
    opt = _adam(model.parameters(), args.adam, args.lr)
    dead = DeadTracker(N_LATENTS, args.dead_window)

    def step(x: torch.Tensor, i: int) -> None:
        opt.zero_grad(set_to_none=True)
        _, z, loss = model(x * scale, dead.mask())
        loss.backward()
        with torch.no_grad():
            w, g = model.W_dec, model.W_dec.grad
            g -= (g * w).sum(-1, keepdim=True) * w
        opt.step()
        with torch.no_grad():
            model.W_dec /= model.W_dec.norm(dim=1, keepdim=True)
        dead.update((z != 0).any(0), x.shape[0])

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x * scale)[0] / scale

    return Runner("dense reference", list(model.parameters()), step, reconstruct)


def sparsify_runner(scale: float, b_dec: torch.Tensor, args) -> Runner | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sparsify
            from sparsify import SparseCoder, SparseCoderConfig
    except Exception as err:  # not installed (or its imports fail): skip, it is optional
        print(f"eai-sparsify not measured: {type(err).__name__}: {err}")
        return None
    torch.manual_seed(0)
    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=N_LATENTS, k=K), device=str(DEVICE), dtype=torch.float32)
    with torch.no_grad():
        sae.b_dec.copy_(b_dec)
    opt = _adam(sae.parameters(), args.adam, args.lr)
    dead = DeadTracker(N_LATENTS, args.dead_window)

    def step(x: torch.Tensor, i: int) -> None:
        opt.zero_grad(set_to_none=True)
        out = sae(x * scale, dead_mask=dead.mask())
        loss = out.fvu + out.auxk_loss / 32  # sparsify's trainer: fvu + auxk_alpha * auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
        fired = torch.zeros(N_LATENTS, dtype=torch.bool, device=DEVICE)
        fired[out.latent_indices.flatten()] = True
        dead.update(fired, x.shape[0])

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return sae(x * scale).sae_out / scale

    return Runner(f"eai-sparsify {sparsify.__version__}", list(sae.parameters()), step, reconstruct)


# ----- measurement ---------------------------------------------------------------------------------
def matmul_seconds(dtype: torch.dtype, reps: int = 10) -> float:
    a = torch.randn(BATCH, D_IN, device=DEVICE).to(dtype)
    b = torch.randn(D_IN, N_LATENTS, device=DEVICE).to(dtype)
    best = math.inf
    for _ in range(reps + 2):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def peak_step_bytes(runner: Runner, x: torch.Tensor, i: int) -> float | None:
    """Peak tensor memory during one step (profiler memory timeline): the tensors the step uses that
    existed before it (parameters, Adam state, the batch, last step's gradients until they are freed;
    the timeline's "pre-existing" entries) plus everything it allocates, at the worst moment. On a
    GPU: the allocator's peak of allocated bytes over the step (everything live on the device)."""
    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        runner.step(x, i)
        sync()
        return float(torch.cuda.max_memory_allocated(DEVICE))
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with profile(
                activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
            ) as prof:
                runner.step(x, i)
            _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
        return float(max(sum(s) for s in sizes)) if sizes else 0.0
    except Exception as err:  # the profiler's memory timeline is private API
        print(f"peak memory of {runner.name} not measured: {type(err).__name__}: {err}")
        return None


def main() -> None:
    global DEVICE, N_LATENTS, K
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per family (after 2 warm-up steps)")
    ap.add_argument(
        "--families",
        default="dense,sparsify,topk,batchtopk,matryoshka,topk-bf16",
        help="comma list of: dense, sparsify, topk, batchtopk, matryoshka, mp, topk-bf16",
    )
    ap.add_argument("--quick", action="store_true", help="8 timed steps")
    ap.add_argument(
        "--adam",
        choices=["fused", "foreach", "default"],
        default="fused",
        help="torch.optim.Adam flavour, the same for every family (default: fused)",
    )
    ap.add_argument(
        "--dead-window",
        type=int,
        default=1_000_000,
        help="tokens without firing after which a latent is dead (AuxK on), as the trainer's "
        "dead_window_tokens; same for all",
    )
    ap.add_argument(
        "--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows of pre-activations per chunk (fused steps)"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    ap.add_argument("--n-latents", default=str(N_LATENTS), help="comma list of dictionary sizes (a table each)")
    ap.add_argument("--k", default=str(K), help="comma list of k (a table for each size and k)")
    ap.add_argument("--no-memory", action="store_true", help="skip the (profiled) peak-memory step")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise with the GPU)")
    ap.add_argument(
        "--fvu-steps",
        type=int,
        default=200,
        help="after timing, every family trains on to this many steps before its FVU is measured",
    )
    args = ap.parse_args()
    DEVICE = torch.device(args.device)
    if args.quick:
        args.steps = min(args.steps, 8)
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = [int(v) for v in args.n_latents.split(",")]
    ks = [int(v) for v in args.k.split(",")]
    summary = []
    for N_LATENTS in widths:
        for K in ks:
            summary += [dict(r, n_latents=N_LATENTS, k=K) for r in run_config(args)]
    if len(summary) > len(widths) * len(ks) and (len(widths) > 1 or len(ks) > 1):
        _width_table(summary)


def run_config(args) -> list[dict]:
    """Every family at the current N_LATENTS and K: prints the table, returns its rows."""
    warmup = 2
    args.total_steps = max(args.fvu_steps, warmup + args.steps + (0 if args.no_memory else 1))
    args.lr = TrainConfig().resolved_lr(N_LATENTS)  # hsae's default, the same for every family

    # Same data for everyone: a pool of synthetic batches (d_in=384, a forest of 1280 features).
    source = SyntheticSource(
        SyntheticConfig(d_in=D_IN, n_roots=256, branching=4, depth=2, p_root=0.04, noise_std=0.05, seed=0)
    )
    n_pool = min(args.total_steps, 32)
    it = source.batches(BATCH, 0, 0, 1)
    pool = [next(it).float().to(DEVICE) for _ in range(n_pool)]
    held_out = source.sample_with_truth(BATCH, stream=7).x.float().to(DEVICE)
    scale = standard_input_scale(pool[0])
    b_dec = init_b_dec_geometric_median(pool[0] * scale)

    t32, t16 = matmul_seconds(torch.float32), matmul_seconds(torch.bfloat16)
    flop = 2 * BATCH * D_IN * N_LATENTS
    limit = BATCH / t32
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {where}; d_in={D_IN} n_latents={N_LATENTS} k={K} "
        f"batch={BATCH}; Adam={args.adam}; dead window {args.dead_window} tokens"
    )
    print(
        f"matmul ({BATCH}x{D_IN})@({D_IN}x{N_LATENTS}): fp32 {flop / t32 / 1e9:.0f} GFLOP/s ({t32 * 1e3:.1f} ms) "
        f"-> limit {limit:,.0f} tokens/s; bf16 {flop / t16 / 1e9:.0f} GFLOP/s ({t16 * 1e3:.1f} ms)"
    )

    builders = {
        "dense": lambda: dense_runner(scale, b_dec, args),
        "sparsify": lambda: sparsify_runner(scale, b_dec, args),
        "topk": lambda: hsae_runner("topk", scale, b_dec, args),
        "batchtopk": lambda: hsae_runner("batchtopk", scale, b_dec, args),
        "matryoshka": lambda: hsae_runner("matryoshka", scale, b_dec, args),
        "mp": lambda: hsae_runner("mp", scale, b_dec, args),
        "topk-bf16": lambda: hsae_runner(
            "topk", scale, b_dec, args, compute_dtype="bfloat16", name="topk (bf16-screened, exact values)"
        ),
    }
    rows = []
    for fam in [f.strip() for f in args.families.split(",") if f.strip()]:
        if fam not in builders:
            raise SystemExit(f"unknown family {fam!r}; choose from {', '.join(builders)}")
        runner = builders[fam]()
        if runner is None:
            continue
        i = 0
        for _ in range(warmup):
            runner.step(pool[i % n_pool], i)
            i += 1
        times = []
        for _ in range(args.steps):
            x = pool[i % n_pool]
            sync()
            t = time.perf_counter()
            runner.step(x, i)
            sync()
            times.append(time.perf_counter() - t)
            i += 1
        param_bytes = sum(p.numel() * p.element_size() for p in runner.params)
        budget = 3 * param_bytes + BATCH * D_IN * 4  # params + Adam's two moments + one batch
        peak = None
        if not args.no_memory:
            peak = peak_step_bytes(runner, pool[i % n_pool], i)
            i += 1
        while i < args.fvu_steps:  # untimed: the same number of steps for every family before its FVU
            runner.step(pool[i % n_pool], i)
            i += 1
        # Median of the timed steps (robust to other load on the machine) and the best one.
        times.sort()
        med = times[len(times) // 2]
        rows.append(
            dict(
                name=runner.name,
                tps=BATCH / med,
                best=BATCH / times[0],
                ms=med * 1e3,
                peak=peak,
                budget=budget,
                fvu=fvu(held_out, runner.reconstruct(held_out)),
                steps=i,
                agreement=None if runner.agreement is None else runner.agreement(held_out),
            )
        )
        if rows[-1]["agreement"] is not None:
            print(
                f"  {runner.name}: bf16 screen chose the float32 top-k entries {rows[-1]['agreement']:.2%} of the time"
            )
        print(
            f"  {runner.name}: {rows[-1]['tps']:,.0f} tokens/s (median step {med * 1e3:.0f} ms, best "
            f"{times[0] * 1e3:.0f} ms), FVU {rows[-1]['fvu']:.4f} after {i} steps",
            flush=True,
        )

    dense_tps = next((r["tps"] for r in rows if r["name"] == "dense reference"), None)
    sp_tps = next((r["tps"] for r in rows if r["name"].startswith("eai-sparsify")), None)
    _table(rows, limit, dense_tps, sp_tps)
    for r in rows:
        r["vs_sparsify"] = r["tps"] / sp_tps if sp_tps else None
    return rows


def _width_table(rows) -> None:
    """How cost grows with width: every size and k, each family against eai-sparsify of the same run."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="training step by width (same data, same process)")
    for h in ("n_latents", "k", "family", "tokens/s", "ms/step", "vs sparsify", "peak MB", "peak/budget", "FVU",
              "screen agreement"):  # fmt: skip
        table.add_column(h, justify="left" if h == "family" else "right")
    for r in rows:
        table.add_row(
            str(r["n_latents"]), str(r["k"]), r["name"], f"{r['tps']:,.0f}", f"{r['ms']:.0f}",
            "-" if r["vs_sparsify"] is None else f"{r['vs_sparsify']:.2f}x",
            "-" if r["peak"] is None else f"{r['peak'] / 2**20:.0f}",
            "-" if r["peak"] is None else f"{r['peak'] / r['budget']:.2f}", f"{r['fvu']:.4f}",
            "-" if r["agreement"] is None else f"{r['agreement']:.2%}",
        )  # fmt: skip
    Console(width=170).print(table)


def _table(rows, limit, dense_tps, sp_tps) -> None:
    def ratio(a, b):
        return f"{a / b:.2f}x" if b else "-"

    header = ["family", "tokens/s", "ms/step", "of limit", "vs dense", "vs sparsify", "peak MB", "peak/budget", "FVU"]
    body = []
    for r in rows:
        peak = "-" if r["peak"] is None else f"{r['peak'] / 2**20:.0f}"
        pb = "-" if r["peak"] is None else f"{r['peak'] / r['budget']:.2f}"
        body.append(
            [
                r["name"],
                f"{r['tps']:,.0f}",
                f"{r['ms']:.0f}",
                f"{r['tps'] / limit:.0%}",
                ratio(r["tps"], dense_tps),
                ratio(r["tps"], sp_tps),
                peak,
                pb,
                f"{r['fvu']:.4f}",
            ]
        )
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"training step, matmul limit {limit:,.0f} tokens/s (FVU on held-out data, same steps)")
        for h in header:
            table.add_column(h, justify="left" if h == "family" else "right")
        for b in body:
            table.add_row(*b)
        Console(width=160).print(table)
    except ImportError:
        widths = [max(len(h), *(len(b[j]) for b in body)) for j, h in enumerate(header)]
        print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=False)))
        for b in body:
            print("  ".join(c.rjust(w) for c, w in zip(b, widths, strict=False)))


if __name__ == "__main__":
    main()
