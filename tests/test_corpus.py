"""electra_fast.corpus: the embedded default corpus (stdlib docs), and ``prepare --default`` offline."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from electra_fast import corpus
from electra_fast.corpus import Document, split_sentences, text_to_sentences, write_corpus


def test_split_sentences_keeps_abbreviations_and_initials_together():
    text = ("Use a list, e.g. a queue. It holds items, i.e. values. The 2. item is J. Smith's. "
            "Really? Yes! See the \"os\" module. Done")
    assert split_sentences(text) == [
        "Use a list, e.g. a queue.", "It holds items, i.e. values.", "The 2. item is J. Smith's.", "Really?", "Yes!",
        "See the \"os\" module.", "Done"]


def test_text_to_sentences_drops_code_and_markup():
    doc = '''Basic customization
*******************

Return the *sum* of the values in ``data``. The result is a float
when any value is one.  See :func:`math.fsum` for details.

   >>> sum([1, 2])
   3

   if __debug__:
       if not expression: raise AssertionError

   assert_stmt ::= "assert" expression ["," expression]

object.__init__(self[, ...])

   Called after the instance has been created.

* First item of the list
  wraps here.
* Second item of the list.

import sys
x = compute(a, b)
'''
    assert text_to_sentences(doc) == [
        "Basic customization",
        "Return the sum of the values in data.",
        "The result is a float when any value is one.",
        "See math.fsum for details.",
        "Called after the instance has been created.",
        "First item of the list wraps here.",
        "Second item of the list.",
    ]


@pytest.fixture(scope="module")
def documents() -> list[Document]:
    return corpus.build_default_corpus()


def test_default_corpus_is_large_varied_and_recorded(documents, tmp_path):
    summary = write_corpus(documents, tmp_path / "corpus.txt")
    text = (tmp_path / "corpus.txt").read_text(encoding="utf-8")
    # Python 3.11 gives about 560 documents, 21k sentences, 1.67M characters.
    assert summary["characters"] > 1_000_000 and summary["documents"] > 300 and summary["sentences"] > 10_000
    sources = [entry["source"] for entry in summary["sources"]]
    assert len(sources) == len(set(sources)) == summary["documents"]
    assert "pydoc_data.topics:assert" in sources and "stdlib:json" in sources and "stdlib-c:math" in sources
    assert {s.split(":")[0] for s in sources} == {"pydoc_data.topics", "stdlib", "stdlib-c"}
    # The file layout the reader expects: one sentence a line, exactly one blank line between documents.
    blocks = text.rstrip("\n").split("\n\n")
    assert len(blocks) == summary["documents"]
    assert all(line.strip() == line and line for block in blocks for line in block.split("\n"))
    lines = text.split("\n")
    assert not any(line.startswith((">>>", "def ", "class ", "import ")) or "::=" in line for line in lines)
    assert summary["sha256"] == __import__("hashlib").sha256(text.encode("utf-8")).hexdigest()
    # Deterministic: built again in a fresh interpreter, the same text.
    again = subprocess.run([sys.executable, "-m", "electra_fast.corpus", str(tmp_path / "again.txt")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.txt").read_text(encoding="utf-8") == text


def test_prepare_default_runs_offline(documents, tmp_path, monkeypatch):
    from electra_fast.manifest import read_manifest
    from electra_fast.prepare import prepare

    # The build itself is checked above (and is stdlib only); reusing its result saves ~8 s here.
    monkeypatch.setattr(corpus, "build_default_corpus", lambda: documents)

    def no_network(*args, **kwargs):
        raise AssertionError("prepare --default tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    out = prepare([], str(tmp_path / "demo"), default_corpus=True, vocab_size=512, seq_len=128, num_proc=1,
                  verbose=False)
    manifest = read_manifest(str(out))
    summary = manifest["default_corpus"]
    assert manifest["inputs"][0]["path"] == "<default corpus>"
    assert manifest["inputs"][0]["sha256"] == summary["sha256"]
    assert len(summary["sources"]) == summary["documents"]
    assert manifest["vocab_size"] == 512 and manifest["num_examples"] > 2000
    assert manifest["num_text_tokens"] > 300_000
    assert not (out / "default_corpus.txt").exists()
