"""The embedded default corpus: English prose that ships with every Python, built at prepare time.

    python -m electra_fast.corpus /tmp/default_corpus.txt     # writes it and prints its size

``electra-fast prepare --default`` uses it so that ``make demo`` runs on a fresh machine without a
download. Two sources, both part of the standard library:

* ``pydoc_data.topics`` — the language reference's topics as ``help()`` shows them (``"assert"``,
  ``"customization"``, ...): one document per topic;
* docstrings of the standard library — module, class, function and method docstrings read with
  :mod:`ast` from the library's ``.py`` sources (nothing is imported, so no module's import-time side
  effects run), plus the C modules' docstrings (``builtins``, ``math``, ``itertools``, ...), which exist
  only at run time: one document per module.

The text is written in the reference ELECTRA layout (``build_pretraining_dataset.py``): one sentence a
line, a blank line between documents. Code is not English and would teach the model Python syntax, so
paragraphs that look like code (doctests, grammar productions, indented examples, signatures) are
dropped, reST/pydoc mark-up is removed, and paragraphs are split into sentences.

The result depends on the Python version (the stdlib's docs change between releases); the manifest
records that version, the corpus hash and the source of every document.

Standard library only: this module must not import ``datasets`` (the data modules do).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

# Bumped whenever the extraction rules change, so a prepared default corpus is rebuilt.
CORPUS_VERSION = 1

# Folders of the stdlib that hold tests, demos, bundled wheels or generated tables rather than
# documented library code.
_SKIPPED_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages",
    "__pycache__", "ensurepip", "lib2to3", "__phello__", "encodings",
})
# C modules that are test fixtures, or whose import touches the terminal (readline).
_SKIPPED_C_MODULES = frozenset({"readline", "antigravity", "this"})

_PY_KEYWORDS = frozenset({
    "def", "class", "if", "elif", "else", "for", "while", "with", "try", "except", "finally", "return",
    "raise", "import", "from", "async", "await", "yield", "print", "lambda", "assert", "del", "pass",
    "global", "nonlocal", "break", "continue", "match", "case",
})
# Abbreviations after which a full stop does not end a sentence.
_ABBREVIATIONS = frozenset({
    "e.g.", "i.e.", "etc.", "vs.", "cf.", "mr.", "mrs.", "dr.", "st.", "no.", "approx.", "fig.", "al.",
    "ca.", "resp.", "incl.", "esp.", "viz.", "ver.", "vol.", "jan.", "feb.", "aug.", "sep.", "sept.",
    "oct.", "nov.", "dec.",
})
_SYMBOLS = "()[]{}=<>;*+/%|&^~@#\\$`"
_SYMBOL_RUN = re.compile("[" + re.escape(_SYMBOLS) + "]")
_LETTER_RUNS = re.compile(r"[^\W\d_]+")  # letters of any script
_UNDERLINE = re.compile(r"^([*=\-~^\"'#+`])\1{2,}\s*$")
_SIGNATURE = re.compile(r"^[A-Za-z_][\w.]*\s*\(.*\)\s*(->.*)?:?$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][\w.\[\]'\"]*\s*(=|\+=|-=|\*=|/=|:=)\s*\S")
_IMPORT = re.compile(r"^(import [\w.]+|from [\w.]+ import )")
_BULLET = re.compile(r"^([*\-+•]|\(?\d{1,2}[.)]|\(?[a-z][.)])\s+")
_REST_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_DIRECTIVE = re.compile(r"^\.\.\s+[\w:-]+::|^\.\.\s*$|^\.\.\s+_|^:[\w ]+:")


@dataclass(frozen=True)
class Document:
    """One document of the corpus: where it comes from and its sentences, one per line."""

    source: str  # "pydoc_data.topics:assert", "stdlib:json.decoder", "stdlib-c:math"
    sentences: tuple[str, ...]


# --------------------------------------------------------------------------------------------------
# Text clean-up: paragraphs -> prose paragraphs -> sentences
# --------------------------------------------------------------------------------------------------


def _count_letters(text: str) -> int:
    return sum(map(len, _LETTER_RUNS.findall(text)))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _paragraphs(text: str) -> Iterator[list[str]]:
    """Blank-line separated blocks; a heading (a line over an underline of ``*``/``=``/``-``) is its own block."""
    block: list[str] = []
    for line in text.expandtabs(8).splitlines():
        if not line.strip():
            if block:
                yield block
            block = []
        elif _UNDERLINE.match(line.strip()):
            # The underline marks the line above it as a heading: emit that heading alone.
            if block:
                heading = block.pop()
                if block:
                    yield block
                yield [heading]
            block = []
        else:
            block.append(line.rstrip())
    if block:
        yield block


def _is_code_line(stripped: str) -> bool:
    if stripped.startswith((">>>", "...", "$ ", "# ", "#!", "@", "%", "|")) or "::=" in stripped:
        return True
    if _SIGNATURE.match(stripped) or _ASSIGNMENT.match(stripped) or _IMPORT.match(stripped):
        return True
    first = stripped.split(None, 1)[0]
    symbols = len(_SYMBOL_RUN.findall(stripped))
    if first in _PY_KEYWORDS and (stripped.endswith(":") or symbols):
        return True
    visible = len(stripped) - stripped.count(" ")
    # Prose has few brackets/operators; 1 in 10 visible characters is already code or a table.
    return symbols > 0.1 * visible


def _is_prose(block: list[str]) -> bool:
    """Whether a paragraph is English text and not code, a table, a grammar rule or reST mark-up."""
    if _DIRECTIVE.match(block[0].strip()):
        return False
    # Judged after mark-up removal: "*emphasis*" and ``literals`` are prose, not operators.
    stripped = [_remove_markup(line) for line in block]
    if sum(_is_code_line(s) for s in stripped) * 2 >= len(stripped):
        return False
    if any(s.startswith((">>>", "...")) or "::=" in s for s in stripped):
        return False
    # Nested indentation inside one paragraph is code (an "if:" body, a dict literal), unless it is
    # the hanging indent of a list item or of a "term: definition" body.
    base = _indent(block[0])
    for line in block[1:]:
        if _indent(line) != base and not _BULLET.match(block[0].strip()):
            if _indent(line) < base or _indent(line) > base + 4:
                return False
    words = " ".join(stripped).split()
    letters = _count_letters("".join(words))
    return letters >= 0.6 * max(1, sum(len(w) for w in words))


def _remove_markup(text: str) -> str:
    text = _REST_ROLE.sub(r"\1", text)
    text = text.replace("``", "").replace("**", "")
    text = re.sub(r"(?<![\w*])\*(\S[^*]*?\S|\S)\*(?![\w*])", r"\1", text)  # *emphasis*
    text = re.sub(r"`([^`]+)`_?", r"\1", text)
    return " ".join(text.split())


def _split_items(block: list[str]) -> list[str]:
    """A paragraph as text units: the whole paragraph, or one unit per bullet item of a list."""
    items: list[list[str]] = []
    for line in block:
        stripped = line.strip()
        bullet = _BULLET.match(stripped)
        if bullet or not items:
            items.append([stripped[bullet.end():] if bullet else stripped])
        else:
            items[-1].append(stripped)
    return [_remove_markup(" ".join(item)) for item in items]


def _ends_sentence(token: str) -> bool:
    core = token.rstrip("\"')]’”")
    if not core.endswith((".", "!", "?")):
        return False
    if core.lower() in _ABBREVIATIONS:
        return False
    # Initials ("J.") and enumerations ("1.", "a.") do not end a sentence.
    word = core[:-1]
    return not (len(word) <= 1 or word.isdigit())


def split_sentences(text: str) -> list[str]:
    """Split a paragraph at '.', '!' or '?' followed by a capitalised word, skipping abbreviations."""
    tokens = text.split()
    sentences: list[str] = []
    current: list[str] = []
    for index, token in enumerate(tokens):
        current.append(token)
        following = tokens[index + 1] if index + 1 < len(tokens) else ""
        starts_new = following[:1].isupper() or following[:1].isdigit() or following[:2] in ('"A', "'A") \
            or (following[:1] in "\"'(“‘" and following[1:2].isupper())
        if not following or (_ends_sentence(token) and starts_new):
            sentences.append(" ".join(current))
            current = []
    return sentences


def _is_good_sentence(sentence: str) -> bool:
    words = sentence.split()
    if len(words) < 3:
        return False
    letters = _count_letters(sentence)
    return letters >= 0.5 * len(sentence) and not _is_code_line(sentence)


def text_to_sentences(text: str) -> list[str]:
    """Prose sentences of a docstring or help topic, code and mark-up removed."""
    sentences: list[str] = []
    for block in _paragraphs(text):
        if len(block) == 1 and len(block[0].split()) <= 8 and not block[0].rstrip().endswith((".", ":")):
            # A heading ("Basic customization"): keep it as a short line of its own, as titles are
            # kept in the reference corpora, unless it is code ("object.__new__(cls[, ...])").
            heading = _remove_markup(block[0].strip())
            if heading and not _is_code_line(heading) and _count_letters(heading) >= 3:
                sentences.append(heading)
            continue
        if not _is_prose(block):
            continue
        for item in _split_items(block):
            sentences.extend(s for s in split_sentences(item) if _is_good_sentence(s))
    return sentences


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def topic_documents() -> list[Document]:
    """One document per ``pydoc_data.topics`` entry (the language reference, as ``help()`` shows it)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split the docs out of the base package
        return []
    documents = []
    for name in sorted(topics):
        sentences = tuple(_unique(text_to_sentences(topics[name])))
        if sentences:
            documents.append(Document(f"pydoc_data.topics:{name}", sentences))
    return documents


def _unique(items: Iterable[str], seen: set[str] | None = None) -> Iterator[str]:
    seen = set() if seen is None else seen
    for item in items:
        if item not in seen:
            seen.add(item)
            yield item


def _docstrings_in_source_order(tree: ast.AST) -> Iterator[str]:
    """Module, class, function and method docstrings, depth first, in the order they appear."""
    doc = ast.get_docstring(tree, clean=True) if isinstance(
        tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else None
    if doc:
        yield doc
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings_in_source_order(child)
        elif isinstance(child, (ast.If, ast.Try)):  # definitions under "if sys.platform ...:" / "try:"
            for grandchild in ast.iter_child_nodes(child):
                if isinstance(grandchild, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield from _docstrings_in_source_order(grandchild)


def _stdlib_sources(stdlib_dir: Path) -> Iterator[tuple[str, Path]]:
    """(dotted module name, path) of the standard library's own ``.py`` files, sorted."""
    for directory, subdirs, files in os.walk(stdlib_dir):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS and not d.startswith((".", "config-")))
        relative = Path(directory).relative_to(stdlib_dir)
        if relative.parts and not (Path(directory) / "__init__.py").is_file():
            subdirs[:] = []  # not a package: nothing importable below it
            continue
        for name in sorted(files):
            if not name.endswith(".py") or name.startswith(".") or name == "__main__.py":
                continue
            parts = list(relative.parts) + ([] if name == "__init__.py" else [name[:-3]])
            if parts and "-" not in "".join(parts):
                yield ".".join(parts), Path(directory) / name


def source_documents(stdlib_dir: str | Path | None = None, seen: set[str] | None = None) -> list[Document]:
    """One document per pure-Python stdlib module: its docstrings, read with :mod:`ast`."""
    stdlib_dir = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    seen = set() if seen is None else seen
    documents = []
    for module, path in _stdlib_sources(stdlib_dir):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old modules
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # e.g. a file written for another Python version; not worth failing over
        sentences: list[str] = []
        for doc in _docstrings_in_source_order(tree):
            if doc in seen:
                continue
            seen.add(doc)
            sentences.extend(text_to_sentences(doc))
        sentences = list(_unique(sentences))
        if sentences:
            documents.append(Document(f"stdlib:{module}", tuple(sentences)))
    return documents


def _c_module_names() -> list[str]:
    """Stdlib modules implemented in C (built in or extension modules): their docs exist only at run time."""
    names = []
    for name in sorted(getattr(sys, "stdlib_module_names", ())):
        if name in _SKIPPED_C_MODULES or name.startswith(("_test", "_xx", "xx", "_ctypes_test")):
            continue
        if name in sys.builtin_module_names:
            names.append(name)
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = getattr(spec, "origin", None) or ""
        if origin.endswith((".so", ".pyd")):
            names.append(name)
    return names


def _defined_in_c_module(obj: object, module) -> bool:
    """A function or class the C module itself defines, not a constant (its __doc__ is its type's) or a
    replacement installed at run time (pytest swaps ``sys.unraisablehook`` for a Python function),
    which would make the corpus depend on the process that builds it."""
    if inspect.isbuiltin(obj):
        return getattr(obj, "__self__", None) is module
    if isinstance(obj, type):
        return obj.__module__ in (module.__name__, module.__name__.lstrip("_"))
    return False


def c_module_documents(seen: set[str] | None = None) -> list[Document]:
    """One document per C module: the module's docstring, then its public functions, classes and methods."""
    seen = set() if seen is None else seen
    documents = []
    for name in _c_module_names():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated modules warn on import
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001  a module this build lacks (e.g. _tkinter without Tk)
            continue
        docs = [module.__doc__]
        for attribute in sorted(vars(module)):
            if attribute.startswith("_"):
                continue
            # sys keeps the original of each hook a program may replace (sys.__excepthook__, ...).
            original = getattr(module, f"__{attribute}__", None) if name == "sys" else None
            obj = original or getattr(module, attribute)
            if not _defined_in_c_module(obj, module):
                continue
            docs.append(getattr(obj, "__doc__", None))
            if isinstance(obj, type):
                for member in sorted(vars(obj)):
                    if not member.startswith("_"):
                        docs.append(getattr(vars(obj)[member], "__doc__", None))
        sentences: list[str] = []
        for doc in docs:
            if not isinstance(doc, str) or doc in seen:
                continue
            seen.add(doc)
            sentences.extend(text_to_sentences(inspect.cleandoc(doc)))
        sentences = list(_unique(sentences))
        if sentences:
            documents.append(Document(f"stdlib-c:{name}", tuple(sentences)))
    return documents


def build_default_corpus() -> list[Document]:
    """The default corpus's documents, in a fixed order: help topics, then Python modules, then C modules."""
    seen: set[str] = set()  # the same docstring in two places (inherited, re-exported) is kept once
    documents = topic_documents() + source_documents(seen=seen) + c_module_documents(seen=seen)
    # Several help topics share paragraphs ("assignment" and "augassign"), and docstrings repeat each
    # other across modules; a long sentence is kept only the first time it appears. Short ones ("Return
    # True if the stream is closed.") are common phrasing, not copies, and stay.
    seen_sentences: set[str] = set()
    unique_documents = []
    for document in documents:
        kept = []
        for sentence in document.sentences:
            if len(sentence.split()) >= 6:
                if sentence in seen_sentences:
                    continue
                seen_sentences.add(sentence)
            kept.append(sentence)
        if kept:
            unique_documents.append(Document(document.source, tuple(kept)))
    return unique_documents


def write_corpus(documents: list[Document], path: str | Path) -> dict:
    """Write documents as text (one sentence a line, blank line between documents) and describe them.

    Returns the summary the manifest records: counts, the file's sha256 and each document's source.
    """
    digest = hashlib.sha256()
    sentences = characters = 0
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        for index, document in enumerate(documents):
            block = ("\n" if index else "") + "\n".join(document.sentences) + "\n"
            out.write(block)
            digest.update(block.encode("utf-8"))
            sentences += len(document.sentences)
            characters += sum(len(s) for s in document.sentences)
    return {
        "corpus_version": CORPUS_VERSION,
        "python": sys.version.split()[0],
        "documents": len(documents),
        "sentences": sentences,
        "characters": characters,
        "sha256": digest.hexdigest(),
        "sources": [{"source": d.source, "sentences": len(d.sentences)} for d in documents],
    }


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "default_corpus.txt"
    summary = write_corpus(build_default_corpus(), target)
    print(f"{target}: {summary['documents']} documents, {summary['sentences']} sentences, "
          f"{summary['characters']} characters (Python {summary['python']})")
