"""Small models and a fake LLM server shared by the interpretation and browser tests (not a test module).

- `minilm_model()`: a store of ~2400 MiniLM tokens on topic sentences, a TopK SAE trained briefly on
  it, its examples file and offline labels. Built once per test process.
- `gpt2_model()`: a tiny random GPT-2 with a word-level tokenizer (its whitespace-split vocabulary
  holds markup such as <script>alert(1)</script> as single tokens), an SAE on `transformer.h.0`
  trained on the fly, and its examples found on the fly (`--corpus`): the causal-LM paths.
- `FakeLLM`: an OpenAI-compatible chat endpoint on 127.0.0.1 that labels, detects and fuzzes by rule.
"""

from __future__ import annotations

import atexit
import json
import re
import shutil
import tempfile
import threading
from collections import Counter
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from hsae.cli import main

TOPICS = {
    "animals": ["dog", "cat", "horse", "wolf", "tiger", "rabbit"],
    "music": ["guitar", "piano", "violin", "drum", "flute", "trumpet"],
    "sport": ["football", "tennis", "hockey", "golf", "rugby", "cricket"],
    "food": ["bread", "cheese", "apple", "rice", "soup", "butter"],
}
FRAMES = [
    "the {w} was seen near the old river this morning",
    "she said that a {w} is better than any other thing",
    "every child in the village knew about the {w}",
    "a small {w} and a large {w} stood together",
]
XSS = "<script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=alert(1)>"


def corpus_lines() -> list[str]:
    lines = [frame.format(w=w) for words in TOPICS.values() for w in words for frame in FRAMES]
    lines += [f"the page showed {XSS} and then {XSS_IMG} to the reader"] * 6
    return lines


_ROOT = Path(tempfile.mkdtemp(prefix="hsae-interpret-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


def run(*args: str) -> None:
    code = main(list(args))
    assert code == 0, f"hsae {' '.join(args)} exited with {code}"


@lru_cache(maxsize=1)
def minilm_model() -> Path:
    corpus = _ROOT / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines()) + "\n")
    store, model = _ROOT / "minilm-store", _ROOT / "minilm"
    run("harvest", "--corpus", str(corpus), "--tokens", "2400", "--shard-rows", "700", "--out", str(store))
    run("train", "--arch", "topk", "--data", str(store), "--n-latents", "96", "--k", "4", "--steps", "80",
        "--batch-size", "256", "-q", "--out", str(model))  # fmt: skip
    run("examples", str(model), "--random-contexts", "256", "--batch-rows", "512")
    run("label", str(model))
    return model


def word_level_gpt2(folder: Path, lines: list[str]) -> Path:
    """A random 2-layer GPT-2 whose tokenizer splits on whitespace only."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = sorted({w for line in lines for w in line.split()})
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]")
    import torch

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@lru_cache(maxsize=1)
def gpt2_model() -> Path:
    lines = corpus_lines()
    corpus = _ROOT / "gpt2-corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    base = word_level_gpt2(_ROOT / "gpt2-base", lines)
    model = _ROOT / "gpt2-sae"
    run("train", "--arch", "topk", "--corpus", str(corpus), "--model", str(base), "--hook", "transformer.h.0",
        "--n-latents", "64", "--k", "4", "--steps", "40", "--batch-size", "128", "-q", "--out", str(model))  # fmt: skip
    run("examples", str(model), "--corpus", str(corpus), "--random-contexts", "128", "--batch-rows", "256")
    run("label", str(model))
    return model


# --- a fake OpenAI-compatible endpoint --------------------------------------------------------

MARKED = re.compile(r"<<(.+?)>>")


class FakeLLM:
    """POST /v1/chat/completions, answered by rule from the prompts hsae sends:
    - labelling (the system prompt asks for [EXPLANATION]): the most common marked word;
    - detection: 1 for each excerpt holding the description's first word;
    - fuzzing: 1 for each excerpt whose marked tokens hold it.
    `garbage = True` makes every answer unreadable. Requests are kept (headers and bodies)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.garbage = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {k.lower(): v for k, v in self.headers.items()}
                fake.requests.append({"path": self.path, "headers": headers, "body": body})
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                answer = fake.answer(body["messages"][0]["content"], body["messages"][1]["content"])
                payload = json.dumps(
                    {
                        "id": "fake",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, system: str, user: str) -> str:
        if self.garbage:
            return "I am not sure."
        if "[EXPLANATION]" in system:
            words = Counter(m.strip().lower() for m in MARKED.findall(user))
            return f"The marked tokens are the same word.\n[EXPLANATION]: {words.most_common(1)[0][0]}"
        described = user.split("\n", 1)[0].removeprefix("Description: ").split(",")[0].split(":")[-1].strip().lower()
        excerpts = re.findall(r"^Excerpt \d+: (.*)$", user, flags=re.MULTILINE)
        if "marked" in system:
            votes = [int(any(described in m.lower() for m in MARKED.findall(e))) for e in excerpts]
        else:
            votes = [int(described in e.lower()) for e in excerpts]
        return json.dumps(votes)
