"""Harvest throughput: early stop against a plain full forward pass of the same model, same batches.

    python benchmarks/harvest.py                       # MiniLM on WordNet (or built-in sentences)
    python benchmarks/harvest.py --docs 4000 --hooks encoder.layer.1,encoder.layer.3,encoder.layer.5

Every measurement runs in a fresh child process, so its peak resident memory (ru_maxrss) is its own.
Modes, all over the same token-budget batches:
  full forward   `model(**batch)` with no hooks, then the same row selection (the baseline)
  early stop     the harvester: hooks, forward stopped right after the hooked module
  bf16           the same with the forward under bf16 autocast (`--compute-dtype bfloat16`), with the
                 activation error against the float32 harvest of the same rows
  -> store       the harvester writing a float16 store (shards, checksums, manifest)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

FALLBACK_TEXTS = [
    f"The {a} near the {b} was {c} when the {d} arrived, as everyone in the {b} expected."
    for a in ("dog", "river", "teacher", "storm", "market")
    for b in ("city", "forest", "harbour", "school")
    for c in ("quiet", "loud", "late", "early", "bright")
    for d in ("train", "letter", "winter", "doctor")
]


def documents(n: int) -> tuple[list[str], str]:
    from hsae.sources import text

    if text.wordnet_available():
        return text.take(text.wordnet_corpus(), n), "wordnet"
    return (FALLBACK_TEXTS * (n // len(FALLBACK_TEXTS) + 1))[:n], "built-in sentences"


def worker(mode: str, hook: str, docs: int, batch_tokens: int, device: str, repeats: int) -> dict:
    import torch
    from transformers.utils import logging

    from hsae.sources.harvest import harvest_to_store
    from hsae.sources.hf import Harvester, load_model

    logging.disable_progress_bar()
    texts, _ = documents(docs)
    loaded = load_model(device=device)
    harvester = Harvester(
        loaded,
        [hook],
        batch_tokens=batch_tokens,
        max_length=128,
        early_stop=mode != "full",
        compute_dtype="bfloat16" if mode == "bf16" else "float32",
    )
    plans = list(harvester.plan(texts))
    keep_special = harvester.keep_special

    def full_forward() -> int:
        rows = 0
        for plan in plans:
            padded = loaded.tokenizer.pad([d.encoding for d in plan.documents], return_tensors="pt")
            special = padded.pop("special_tokens_mask").bool()
            with torch.inference_mode():
                out = loaded.model(**{k: v.to(loaded.device) for k, v in padded.items()}, output_hidden_states=True)
            keep = padded["attention_mask"].bool() & (~special | keep_special)
            layer = int(hook.rsplit(".", 1)[1]) + 1
            rows += len(out.hidden_states[layer][keep.to(loaded.device)].float().cpu())
        return rows

    def early_stop() -> int:
        return sum(len(harvester.run(plan)) for plan in plans)

    def to_store() -> int:
        with tempfile.TemporaryDirectory() as folder:
            store = harvest_to_store(
                Path(folder) / "s", harvester, texts, tokens=10**12, dtype="float16", shard_rows=65536
            )
            return store.total_rows

    run = {"full": full_forward, "early": early_stop, "bf16": early_stop, "store": to_store}[mode]
    run()  # warm-up (and, for the harvester, the one full pass that learns where to stop)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        rows = run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    error = {}
    if mode == "bf16":  # against the float32 harvest of the same rows
        exact = Harvester(loaded, [hook], batch_tokens=batch_tokens, max_length=128)
        a = torch.cat([exact.run(p).activations[hook] for p in plans]).double()
        b = torch.cat([harvester.run(p).activations[hook] for p in plans]).double()
        error = {
            "rel_error": float((a - b).norm(dim=1).mean() / a.norm(dim=1).mean()),
            "min_cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=1).min()),
        }
    return {
        **error,
        "rows": rows,
        "seconds": min(times),
        "tokens_per_s": rows / min(times),
        # CPU time of all the process's threads: steadier than wall time on a shared machine.
        "tokens_per_cpu_s": rows / min(cpu_times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=3000, help="documents harvested per measurement")
    parser.add_argument("--hooks", default="encoder.layer.2,encoder.layer.3", help="comma-separated hooks")
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "HOOK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.docs, args.batch_tokens, args.device, args.repeats)))
        return

    from rich.console import Console
    from rich.table import Table

    _, corpus = documents(1)
    table = Table(title=f"harvest, all-MiniLM-L6-v2 (6 layers), {args.docs} {corpus} documents, {args.device}")
    columns = ("hook", "mode", "tokens", "tokens/s", "speed-up", "tokens/CPU-s", "speed-up (CPU)", "peak RSS MiB",
               "error vs fp32")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right" if column not in ("hook", "mode") else "left")
    names = {"full": "full forward", "early": "early stop", "bf16": "early stop, bf16", "store": "early stop -> store"}
    for hook in args.hooks.split(","):
        results = {}
        for mode in ("full", "early", "bf16", "store"):
            child = subprocess.run(
                [sys.executable, __file__, "--worker", mode, hook, "--docs", str(args.docs),
                 "--batch-tokens", str(args.batch_tokens), "--device", args.device, "--repeats", str(args.repeats)],
                capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            )  # fmt: skip
            if child.returncode:
                sys.exit(child.stderr)
            results[mode] = json.loads(child.stdout.strip().splitlines()[-1])
            r = results[mode]
            table.add_row(
                hook, names[mode], str(r["rows"]), f"{r['tokens_per_s']:,.0f}",
                f"{r['tokens_per_s'] / results['full']['tokens_per_s']:.2f}x", f"{r['tokens_per_cpu_s']:,.0f}",
                f"{r['tokens_per_cpu_s'] / results['full']['tokens_per_cpu_s']:.2f}x", f"{r['peak_rss_mib']:,.0f}",
                f"{r['rel_error']:.2e} (min cos {r['min_cosine']:.4f})" if "rel_error" in r else "",
            )  # fmt: skip
    Console(width=max(120, Console().width)).print(table)


if __name__ == "__main__":
    main()
