"""The examples pass against a plain encode pass of the same tokens, and the browser's API latency.

    python benchmarks/examples.py [--data STORE] [--n-latents 16384] [--tokens 1000000]

In one run, on one model (a TopK SAE, k=32, of --n-latents latents at the store's width; its weights are
random: the pass's cost depends on the codes' sparsity, which TopK fixes, not on what they mean):
1. a plain encode pass: every chunk of the store read and encoded, nothing kept;
2. the examples pass (`hsae.interpret.examples.build_examples`) over the same tokens, file written;
each in a fresh process, so that its peak resident memory is its own; then
3. offline labels for every feature, and
4. the browser (`hsae serve`'s app under uvicorn on 127.0.0.1) asked for random features, root pages,
   searches and the model, timed from a client (median and 95th percentile).
Without --data (or without the store) the rows are random normal activations with short documents.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def make_model(out: Path, d_in: int, n_latents: int, k: int) -> None:
    from hsae.config import from_dict
    from hsae.models import get_family

    family = get_family("topk")
    sae = family.from_config(
        from_dict(family.config_class, {"arch": "topk", "d_in": d_in, "n_latents": n_latents, "k": k})
    )
    sae.save(out, record={"data": {}})


class RandomStream:
    """Random activations in documents of 4..30 tokens, MiniLM's tokenizer for the token text."""

    def __init__(self, rows: int, d_in: int, chunk: int = 4096):
        self.total_rows, self.d_in, self.chunk = rows, d_in, chunk

    def describe(self):
        return {"kind": "random", "rows": self.total_rows}

    def load_model(self):
        from hsae.sources.hf import load_model

        return load_model(None, device="cpu")

    def chunks(self, place=None):
        import torch

        from hsae.interpret.streams import TokenChunk

        g = torch.Generator().manual_seed(0)
        for lo in range(int(place or 0), self.total_rows, self.chunk):
            n = min(self.chunk, self.total_rows - lo)
            docs = (torch.arange(lo, lo + n) // 17).long()
            yield TokenChunk(
                torch.randn(n, self.d_in, generator=g), torch.randint(1000, 29000, (n,), generator=g), docs,
                torch.arange(lo, lo + n) % 17, lo + n,
            )  # fmt: skip


def open_stream(data: str | None, rows: int, d_in: int):
    from hsae.interpret.streams import StoreStream
    from hsae.store import ActivationStore

    if data and (Path(data) / "manifest.json").is_file():
        return StoreStream(ActivationStore.open(data, max_norm_ratio=0))
    return RandomStream(rows, d_in)


class Limited:
    """The first `rows` rows of a stream."""

    def __init__(self, stream, rows: int):
        self.stream, self.total_rows = stream, min(rows, stream.total_rows or rows)

    def describe(self):
        return {**self.stream.describe(), "limit": self.total_rows}

    def load_model(self):
        return self.stream.load_model()

    def chunks(self, place=None):
        from hsae.interpret.streams import TokenChunk

        done = int(place or 0)
        for chunk in self.stream.chunks(place):
            take = min(self.total_rows - done, chunk.activations.shape[0])
            if take <= 0:
                return
            done += take
            yield TokenChunk(chunk.activations[:take], chunk.token_ids[:take], chunk.doc_ids[:take],
                             chunk.positions[:take], done)  # fmt: skip


def phase(kind: str, model_dir: str, data: str | None, rows: int, threads: int, queue) -> None:
    """One measured phase in its own process: ("encode" | "examples") -> (seconds, rows, peak RSS bytes)."""
    import torch

    import hsae
    from hsae.interpret.examples import ExamplesConfig, build_examples

    torch.set_num_threads(threads)
    sae = hsae.load(model_dir)
    stream = Limited(open_stream(data, rows, sae.d_in), rows)
    t0 = time.perf_counter()
    if kind == "encode":
        n = 0
        with torch.no_grad():
            for chunk in stream.chunks():
                sae.encode(chunk.activations)
                n += chunk.activations.shape[0]
    else:
        run = build_examples(sae, model_dir, stream, ExamplesConfig(tokens=rows), force=True)
        n = run.rows
    seconds = time.perf_counter() - t0
    queue.put((seconds, n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def measured(kind: str, *args) -> tuple[float, int, int]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=phase, args=(kind, *args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_latency(model_dir: Path, samples: int) -> dict[str, tuple[float, float]]:
    import uvicorn

    from hsae.serve.app import create_app

    app = create_app([model_dir])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    while not server.started:
        time.sleep(0.05)
    model = json.load(urllib.request.urlopen(f"{base}/api/model"))
    labels = json.load(urllib.request.urlopen(f"{base}/api/features?parent=-1&limit=1000"))["items"]
    words = [s["label"].split(", ")[0] for s in labels if s["label"]] or ["the"]
    rng = random.Random(0)
    routes = {
        "GET /api/features/{i}": lambda: f"/api/features/{rng.randrange(model['n_latents'])}",
        "GET /api/features?parent=-1": lambda: f"/api/features?parent=-1&offset={rng.randrange(0, 2000)}&limit=200",
        "GET /api/search?q=": lambda: f"/api/search?q={urllib.request.quote(rng.choice(words))}",
        "GET /api/model": lambda: "/api/model",
    }
    out = {}
    for name, path in routes.items():
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            urllib.request.urlopen(base + path()).read()
            times.append(time.perf_counter() - t0)
        times.sort()
        out[name] = (statistics.median(times) * 1000, times[int(0.95 * (len(times) - 1))] * 1000)
    server.should_exit = True
    thread.join(timeout=10)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="runs/demo/store", help="an activation store (else random rows)")
    parser.add_argument("--n-latents", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=1_000_000, help="at most the store's rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=200, help="requests per API route")
    args = parser.parse_args()

    from hsae.store import ActivationStore

    has_store = (Path(args.data) / "manifest.json").is_file()
    d_in = ActivationStore.open(args.data, max_norm_ratio=0).d_in if has_store else 384
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        make_model(model_dir, d_in, args.n_latents, args.k)
        data = args.data if has_store else None
        enc_s, enc_rows, enc_rss = measured("encode", str(model_dir), data, args.tokens, args.threads)
        ex_s, ex_rows, ex_rss = measured("examples", str(model_dir), data, args.tokens, args.threads)
        assert enc_rows == ex_rows, (enc_rows, ex_rows)

        from hsae.interpret.examples_db import open_examples
        from hsae.interpret.labels import write_labeller
        from hsae.interpret.offline_labels import offline_labels

        t0 = time.perf_counter()
        db = open_examples(model_dir)
        write_labeller(model_dir, "offline", {"settings": {}, "examples": db.stamp(), "labels": offline_labels(db)})
        label_s = time.perf_counter() - t0
        size = (model_dir / "examples.sqlite").stat().st_size
        latency = api_latency(model_dir, args.samples)

    source = f"store {args.data}" if has_store else "random rows"
    print(
        f"\n{args.n_latents} latents, k={args.k}, d_in={d_in}, {ex_rows} tokens of {source}, {args.threads} threads\n"
    )
    print("| pass | seconds | tokens/s | vs encode | peak RSS |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| plain encode | {enc_s:.1f} | {enc_rows / enc_s:,.0f} | 1.00x | {enc_rss / 2**20:,.0f} MiB |")
    ratio, peak = ex_s / enc_s, ex_rss / 2**20
    print(f"| examples pass (file written) | {ex_s:.1f} | {ex_rows / ex_s:,.0f} | {ratio:.2f}x | {peak:,.0f} MiB |")
    print(f"\nexamples file {size / 2**20:.0f} MiB; offline labels for every feature {label_s:.1f} s\n")
    print(f"| API route ({args.samples} requests) | median ms | p95 ms |")
    print("| --- | --- | --- |")
    for name, (median, p95) in latency.items():
        print(f"| {name} | {median:.1f} | {p95:.1f} |")


if __name__ == "__main__":
    main()
