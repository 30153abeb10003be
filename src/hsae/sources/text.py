"""Text corpora: local files, local Hugging Face datasets, and WordNet.

A corpus is a re-iterable, deterministic sequence of documents (strings). Harvesting numbers the
documents it reads 0, 1, 2, ... in this order, and the store keeps that number (`doc_ids`) for every
activation row.

- `.txt` files: one document per non-blank line (corpora of sentences or glosses are line-based, and
  a line-per-document file streams without reading the whole file).
- `.jsonl` files: one JSON object per line, the document is its `"text"` field (or `text_field`).
- `.parquet` files and folders written by `datasets.Dataset.save_to_disk` (or `DatasetDict`): the
  `"text"` column. Read with `datasets` when installed, else with `pyarrow`; both are optional.
- A folder: every `.txt`, `.jsonl` and `.parquet` file under it, in sorted path order.
- `"wordnet"`: every synset's gloss and example sentences (`wordnet_documents`). `wordnet_noun_tree`
  gives the noun hypernym tree for evaluation.

WordNet is read with nltk's WordNet reader, from an nltk_data folder that has it or from Debian's
`wordnet-base` + `wordnet-sense-index` files (/usr/share/wordnet). nltk reads only from folders on
`nltk.data.path` and wants a `lexnames` file that Debian lacks, so the Debian files are copied, with a
generated `lexnames`, into `$HSAE_HOME/nltk_data/corpora/wordnet` (default `~/.cache/hsae`).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any

from hsae.atomic import atomic_path, write_text
from hsae.errors import HsaeError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
WORDNET = "wordnet"


class Corpus:
    """A named, re-iterable sequence of documents; every iteration yields the same documents."""

    def __init__(self, name: str, open_documents: Callable[[], Iterator[str]], info: dict[str, Any]):
        self.name = name
        self._open_documents = open_documents
        self._info = info

    def __iter__(self) -> Iterator[str]:
        return self._open_documents()

    def describe(self) -> dict[str, Any]:
        """What to record with a store or run: {"kind": ..., "path"/"name": ..., ...}."""
        return dict(self._info)

    def check_not_empty(self) -> Corpus:
        """Raise HsaeError when the corpus has no document with text."""
        if next(iter(self), None) is None:
            raise HsaeError(f"corpus {self.name} is empty: it has no document with text")
        return self


def describe_corpus(corpus: Any) -> dict[str, Any]:
    """What a store or run records about its documents: a Corpus describes itself; any other
    re-iterable of strings is recorded as plain texts."""
    return corpus.describe() if hasattr(corpus, "describe") else {"kind": "texts"}


def open_corpus(spec: str | os.PathLike, *, text_field: str = "text") -> Corpus:
    """`"wordnet"` or a path (text/JSON-lines/parquet file, folder of them, or a saved dataset)."""
    if str(spec) == WORDNET:
        return wordnet_corpus().check_not_empty()
    return file_corpus(spec, text_field=text_field).check_not_empty()


# --- files and local datasets -----------------------------------------------------------------


def file_corpus(path: str | os.PathLike, *, text_field: str = "text") -> Corpus:
    """A corpus from a file, a folder of files, or a folder written by `datasets.save_to_disk`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise HsaeError(f"corpus {path} does not exist (give 'wordnet' or a file/folder of text)")
    info: dict[str, Any] = {"kind": "files", "path": str(path.resolve()), "text_field": text_field}
    if path.is_dir() and _is_saved_dataset(path):
        info["kind"] = "hf_dataset"
        info["split"] = _saved_dataset_split(path).name if (path / "dataset_dict.json").is_file() else None
        return Corpus(str(path), lambda: _saved_dataset_texts(path, text_field), info)
    files = _corpus_files(path)
    if not files:
        raise HsaeError(f"corpus {path} has no {', '.join(TEXT_SUFFIXES)} files")
    info["files"] = len(files)

    def documents() -> Iterator[str]:
        for file in files:
            yield from _file_texts(file, text_field)

    return Corpus(str(path), documents, info)


def _corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise HsaeError(f"corpus file {path}: expected one of {', '.join(TEXT_SUFFIXES)}")
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def _file_texts(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield line.rstrip("\n")
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise HsaeError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise HsaeError(f'{path}:{number}: expected an object with a "{text_field}" field')
                yield from _nonblank(record[text_field])
    else:  # .parquet
        yield from _parquet_texts(path, text_field)


def _nonblank(text: Any) -> Iterator[str]:
    if isinstance(text, str) and text.strip():
        yield text


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise HsaeError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise HsaeError(f"{path} has no {text_field!r} column (columns: {table.schema_arrow.names})")
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield from _nonblank(text)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _saved_dataset_split(path: Path) -> Path:
    """A DatasetDict folder holds one Dataset folder per split: take "train", else the first."""
    if not (path / "dataset_dict.json").is_file():
        return path
    splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
    return path / ("train" if "train" in splits else splits[0])


def _saved_dataset_texts(path: Path, text_field: str) -> Iterator[str]:
    split = _saved_dataset_split(path)
    try:
        import datasets  # optional: the reference reader of this format
    except ImportError:
        datasets = None
    if datasets is not None:
        dataset = datasets.load_from_disk(str(split))
        if text_field not in dataset.column_names:
            raise HsaeError(f"dataset {path} has no {text_field!r} column ({dataset.column_names})")
        for text in dataset[text_field]:
            yield from _nonblank(text)
        return
    try:
        import pyarrow as pa
    except ImportError:
        raise HsaeError(
            f"reading the saved dataset {path} needs `datasets` or `pyarrow`: pip install datasets"
        ) from None
    # save_to_disk writes Arrow IPC streams listed in state.json, in order.
    state = json.loads((split / "state.json").read_text())
    for data_file in state["_data_files"]:
        with pa.memory_map(str(split / data_file["filename"])) as source:
            reader = pa.ipc.open_stream(source)
            if text_field not in reader.schema.names:
                raise HsaeError(f"dataset {path} has no {text_field!r} column ({reader.schema.names})")
            for batch in reader:
                for text in batch.column(text_field).to_pylist():
                    yield from _nonblank(text)


# --- WordNet ----------------------------------------------------------------------------------

# lexnames(5): lexicographer file number, name, syntactic category (1 noun, 2 verb, 3 adj, 4 adv).
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body "
    "verb.change verb.cognition verb.communication verb.competition verb.consumption verb.contact "
    "verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social "
    "verb.stative verb.weather adj.ppl"
).split()
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_POS_ORDER = ("n", "v", "a", "r")  # data.adj holds the adjective satellites ("s") too
_DEBIAN_WORDNET_DIRS = ("/usr/share/wordnet",)
_INSTALL_HINT = (
    "install it with `apt-get install wordnet-base wordnet-sense-index` (Debian/Ubuntu), "
    "or `python -m nltk.downloader wordnet`, or set HSAE_WORDNET_DIR to a WordNet 3.0 dict folder"
)


def lexnames_text() -> str:
    """The content of WordNet's `lexnames` file (lexnames(5)), which Debian does not ship."""
    return "".join(f"{number:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for number, name in enumerate(_LEXNAMES))


def hsae_home() -> Path:
    """hsae's cache folder: $HSAE_HOME, else ~/.cache/hsae."""
    return Path(os.environ.get("HSAE_HOME") or Path.home() / ".cache" / "hsae").expanduser()


def _wordnet_source_dir() -> Path | None:
    """A folder of WordNet dict files (data.noun, index.sense, ...), if one is installed."""
    candidates = [os.environ.get("HSAE_WORDNET_DIR"), os.environ.get("WNSEARCHDIR"), *_DEBIAN_WORDNET_DIRS]
    for candidate in candidates:
        if candidate and (Path(candidate) / "data.noun").is_file() and (Path(candidate) / "index.sense").is_file():
            return Path(candidate)
    return None


def _build_nltk_wordnet(source: Path, nltk_data: Path) -> None:
    """Copy the dict files nltk reads, plus a generated lexnames, into nltk_data/corpora/wordnet."""
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    target = nltk_data / "corpora" / "wordnet"
    for name in WordNetCorpusReader._FILES:
        if name == "lexnames":
            continue
        src, dst = source / name, target / name
        if not src.is_file():
            raise HsaeError(f"WordNet folder {source} lacks {name}: {_INSTALL_HINT}")
        if dst.is_file() and dst.stat().st_size == src.stat().st_size:
            continue
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    # Written last: its presence marks a complete folder (every copy above is atomic).
    if not (target / "lexnames").is_file():
        write_text(target / "lexnames", lexnames_text())


@lru_cache(maxsize=1)
def wordnet_reader():
    """nltk's WordNetCorpusReader for WordNet 3.0 (built from Debian's files on first use)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    own = hsae_home() / "nltk_data"
    if (own / "corpora" / "wordnet" / "lexnames").is_file() and str(own) not in nltk.data.path:
        nltk.data.path.insert(0, str(own))
    try:
        root = nltk.data.find("corpora/wordnet")
    except LookupError:
        source = _wordnet_source_dir()
        if source is None:
            raise HsaeError(f"WordNet is not installed: {_INSTALL_HINT}") from None
        _build_nltk_wordnet(source, own)
        if str(own) not in nltk.data.path:
            nltk.data.path.insert(0, str(own))
        root = nltk.data.find("corpora/wordnet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": not needed
        return WordNetCorpusReader(root, None)


def wordnet_available() -> bool:
    """True when `wordnet_reader()` can work (for tests that skip without WordNet)."""
    try:
        import nltk

        nltk.data.find("corpora/wordnet")
        return True
    except LookupError:
        return _wordnet_source_dir() is not None or (hsae_home() / "nltk_data/corpora/wordnet/lexnames").is_file()


@dataclass(frozen=True)
class WordNetDocument:
    synset: str  # e.g. "dog.n.01"
    kind: str  # "gloss" or "example"
    text: str


def wordnet_documents(pos: str | None = None) -> Iterator[WordNetDocument]:
    """Each synset's gloss, then its example sentences: nouns, verbs, adjectives (with satellites),
    adverbs, each in data-file order.

    `pos` limits to one part of speech ("n", "v", "a", "r"). Document i of `wordnet_corpus(pos)` is
    the i-th item here with text, so a store's doc_ids map back to synsets.
    """
    reader = wordnet_reader()
    for part in (pos,) if pos else _POS_ORDER:
        for synset in reader.all_synsets(part):
            yield WordNetDocument(synset.name(), "gloss", synset.definition())
            for example in synset.examples():
                yield WordNetDocument(synset.name(), "example", example)


def wordnet_corpus(pos: str | None = None) -> Corpus:
    """WordNet's glosses and example sentences as a corpus (see `wordnet_documents`)."""

    def documents() -> Iterator[str]:
        for document in wordnet_documents(pos):
            if document.text.strip():
                yield document.text

    reader = wordnet_reader()
    info = {"kind": "wordnet", "name": WORDNET, "version": reader.get_version(), "pos": pos}
    return Corpus(WORDNET if pos is None else f"{WORDNET}:{pos}", documents, info)


@dataclass(frozen=True)
class SynsetNode:
    """One noun synset of the hypernym tree. `parents` are hypernyms and instance hypernyms."""

    name: str
    parents: tuple[str, ...]
    lemmas: tuple[str, ...]
    definition: str


@lru_cache(maxsize=1)
def wordnet_noun_tree() -> dict[str, SynsetNode]:
    """Every noun synset -> its parents and lemma names; 'entity.n.01' is the only root.

    WordNet's noun hierarchy is a DAG (about 2% of synsets have two parents); consumers that want a
    tree take `parents[0]`. Instance hypernyms ("paris.n.01" -> "city.n.01") count as parents.
    """
    tree = {}
    for synset in wordnet_reader().all_synsets("n"):
        parents = tuple(p.name() for p in synset.hypernyms() + synset.instance_hypernyms())
        tree[synset.name()] = SynsetNode(synset.name(), parents, tuple(synset.lemma_names()), synset.definition())
    return tree


def take(corpus: Corpus, n: int) -> list[str]:
    """The first n documents (for quick checks and tests)."""
    return list(islice(corpus, n))
