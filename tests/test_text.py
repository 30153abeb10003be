"""Corpora from files and local datasets, and WordNet (skipped when WordNet is not installed)."""

from __future__ import annotations

import json

import pytest

from hsae.errors import HsaeError
from hsae.sources import text
from hsae.sources.text import file_corpus, lexnames_text, open_corpus

needs_wordnet = pytest.mark.skipif(
    not text.wordnet_available(),
    reason="WordNet not installed (apt-get install wordnet-base wordnet-sense-index)",
)


def test_txt_file_is_one_document_per_nonblank_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\n\n   \nsecond line\n")
    corpus = open_corpus(path)
    assert list(corpus) == ["first line", "second line"]
    assert list(corpus) == ["first line", "second line"]  # re-iterable
    assert corpus.describe()["kind"] == "files"


def test_jsonl_reads_the_text_field(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert list(open_corpus(path)) == ["one", "two"]
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(HsaeError, match=r'a.jsonl:1: .*"text"'):
        list(file_corpus(path))
    path.write_text("{not json\n")
    with pytest.raises(HsaeError, match="a.jsonl:1: not valid JSON"):
        list(file_corpus(path))


def test_folder_reads_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("from b\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text(json.dumps({"text": "from c"}) + "\n")
    (tmp_path / "a.txt").write_text("from a\n")
    (tmp_path / "notes.md").write_text("ignored\n")
    assert list(open_corpus(tmp_path)) == ["from a", "from b", "from c"]


def test_empty_or_missing_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(HsaeError, match="empty"):
        open_corpus(tmp_path / "empty.txt")
    with pytest.raises(HsaeError, match="does not exist"):
        open_corpus(tmp_path / "nope.txt")
    (tmp_path / "dir").mkdir()
    with pytest.raises(HsaeError, match="has no .txt"):
        open_corpus(tmp_path / "dir")


def test_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "", "beta"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert list(open_corpus(tmp_path / "d.parquet")) == ["alpha", "beta"]


def write_saved_dataset(folder, texts):
    """What `datasets.Dataset.save_to_disk` writes (made with `datasets` when it is installed)."""
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(folder))
        return
    pa = pytest.importorskip("pyarrow")
    folder.mkdir(parents=True)
    table = pa.table({"text": texts})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text("{}")


def test_saved_dataset_folder(tmp_path):
    pytest.importorskip("pyarrow")  # both readers (datasets, or pyarrow alone) need it
    write_saved_dataset(tmp_path / "ds", ["one doc", "", "another doc"])
    corpus = open_corpus(tmp_path / "ds")
    assert list(corpus) == ["one doc", "another doc"]
    assert corpus.describe()["kind"] == "hf_dataset"
    # A DatasetDict folder: the "train" split.
    write_saved_dataset(tmp_path / "dd" / "test", ["test doc"])
    write_saved_dataset(tmp_path / "dd" / "train", ["train doc"])
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "train"]}))
    corpus = open_corpus(tmp_path / "dd")
    assert list(corpus) == ["train doc"] and corpus.describe()["split"] == "train"


def test_lexnames_is_the_fixed_table_of_lexnames_5():
    lines = lexnames_text().splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3"
    assert lines[3] == "03\tnoun.Tops\t1"
    assert lines[29] == "29\tverb.body\t2"
    assert lines[44] == "44\tadj.ppl\t3"


@pytest.mark.skipif(text._wordnet_source_dir() is None, reason="Debian WordNet files not installed")
def test_nltk_folder_is_built_from_debian_files(tmp_path):
    text._build_nltk_wordnet(text._wordnet_source_dir(), tmp_path)
    folder = tmp_path / "corpora" / "wordnet"
    assert (folder / "lexnames").read_text() == lexnames_text()
    assert (folder / "index.sense").stat().st_size > 0
    assert not list(folder.glob(".*.tmp"))
    text._build_nltk_wordnet(text._wordnet_source_dir(), tmp_path)  # idempotent


@needs_wordnet
def test_wordnet_corpus_yields_glosses_and_examples_in_a_fixed_order():
    first = list(text.take(text.wordnet_corpus(), 3))
    assert first[0].startswith("that which is perceived or known")  # entity.n.01's gloss
    assert first == text.take(text.wordnet_corpus(), 3)
    documents = text.wordnet_documents("n")
    assert next(documents) == text.WordNetDocument("entity.n.01", "gloss", first[0])
    assert open_corpus("wordnet").describe()["version"] == "3.0"


@needs_wordnet
def test_wordnet_noun_tree():
    tree = text.wordnet_noun_tree()
    assert len(tree) == 82115
    assert [name for name, node in tree.items() if not node.parents] == ["entity.n.01"]
    dog = tree["dog.n.01"]
    assert "canine.n.02" in dog.parents and "dog" in dog.lemmas
    assert tree["paris.n.01"].parents == ("national_capital.n.01",)  # instance hypernyms count
