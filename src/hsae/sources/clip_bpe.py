"""CLIP's BPE tokenizer built from its merges file, for CLIP checkpoints that come without tokenizer
files. The file is `bpe_simple_vocab_16e6.txt.gz`, read as data: on its own, or from inside an
`open_clip_torch` wheel (`pip download --no-deps open_clip_torch`; never installed or imported,
since installing open_clip upgrades torch).

CLIP's vocabulary (OpenAI's simple tokenizer) is built from the merges: the 256 byte symbols, the
same with the end-of-word mark "</w>", one token per merge (the first 49152 - 256 - 2 merges of the
file, after its version line), then <|startoftext|> and <|endoftext|>: 49408 tokens.
`clip_tokenizer` writes that vocabulary as vocab.json + merges.txt and loads transformers'
CLIPTokenizer from them.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path
from typing import Any

from hsae.atomic import write_text
from hsae.errors import HsaeError

WHEEL_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE stands for bytes with, in byte order of CLIP's
    table: printable Latin-1 bytes map to themselves, the others to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = dict(zip(printable, printable, strict=True))
    extra = 0
    for b in range(256):
        if b not in codes:
            codes[b] = 256 + extra
            extra += 1
    order = printable + [b for b in range(256) if b not in set(printable)]
    return [chr(codes[b]) for b in order]


def read_merges(path: str | Path, limit: int = VOCAB_SIZE - 512 - len(SPECIAL)) -> list[str]:
    """The merges ("a b" lines) of a CLIP BPE file (.txt.gz or an open_clip wheel), at most `limit`."""
    path = Path(path).expanduser()
    try:
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as wheel:
                raw = wheel.read(WHEEL_MEMBER)
        else:
            raw = path.read_bytes()
        text = gzip.decompress(raw).decode("utf-8") if raw[:2] == b"\x1f\x8b" else raw.decode("utf-8")
    except (OSError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise HsaeError(
            f"{path} is not a CLIP BPE file ({err}): give bpe_simple_vocab_16e6.txt.gz or an open_clip_torch wheel"
        ) from None
    lines = text.split("\n")[1:]  # the first line names the file's version
    merges = [ln for ln in lines[:limit] if ln.strip()]
    if not merges or any(len(m.split()) != 2 for m in merges):
        raise HsaeError(f"{path} does not hold BPE merges (pairs of symbols, one per line)")
    return merges


def write_tokenizer_files(merges: list[str], folder: str | Path) -> Path:
    """vocab.json and merges.txt of CLIP's tokenizer for these merges, written into `folder`."""
    base = byte_symbols()
    tokens = base + [s + "</w>" for s in base] + ["".join(m.split()) for m in merges] + list(SPECIAL)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "vocab.json", json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def clip_tokenizer(bpe: str | Path, folder: str | Path) -> Any:
    """transformers' CLIPTokenizer for the merges in `bpe`, its files kept in `folder`."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_tokenizer_files(read_merges(bpe), folder)))
