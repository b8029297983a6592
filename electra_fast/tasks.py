"""Downstream tasks for ``electra-fast finetune``: file readers, label sets and official metrics.

Supported task names (``--task``), their files in ``--data-dir``, reported metrics (the first selects
the best checkpoint) and default epochs:

====================  ===============================================  ===========================  ======
task                  files                                            metrics                      epochs
====================  ===============================================  ===========================  ======
cola                  train.tsv, dev.tsv (no header)                   mcc, accuracy                3
sst-2                 train.tsv, dev.tsv                               accuracy                     3
mrpc                  train.tsv, dev.tsv                               accuracy, f1                 3
sts-b                 train.tsv, dev.tsv                               spearman, pearson            10
qqp                   train.tsv, dev.tsv                               accuracy, f1                 3
mnli                  train.tsv, dev_matched.tsv (+ dev_mismatched)    accuracy                     3
qnli                  train.tsv, dev.tsv                               accuracy                     3
rte                   train.tsv, dev.tsv                               accuracy                     10
classification        train.* and dev.* (.jsonl .json .csv .tsv)      accuracy (+ f1, mcc if 2)    3
regression            train.* and dev.* (.jsonl .json .csv .tsv)      spearman, pearson, mse       3
token-classification  train.* and dev.* (.txt .conll .bio .iob .tsv)  f1, precision, recall, acc.  3
====================  ===============================================  ===========================  ======

(``dev`` may also be named ``validation``, ``valid`` or ``val``; ``task.train_file`` / ``task.dev_file``
name other files. Aliases: sst2, stsb, sts, ner, tagging.)

The selecting metric follows the ELECTRA paper (Matthews correlation for CoLA, Spearman for STS-B,
accuracy elsewhere; entity-level F1 for tagging); ``--set task.metric=f1`` picks another reported one.

GLUE files are read in their published layouts (the GLUE download script's TSVs: tab-separated, no
quoting). Where a file has a header the columns are found by name, so a file from another task, or a
test file without labels, is an error naming the file and the columns it lacks:

* CoLA: no header; ``source, label, original_annotation, sentence``.
* SST-2: ``sentence, label``.   MRPC: ``Quality, #1 ID, #2 ID, #1 String, #2 String``.
* STS-B: ``index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score``.
* QQP: ``id, qid1, qid2, question1, question2, is_duplicate``.   QNLI: ``index, question, sentence, label``.
* MNLI: ``index, promptID, pairID, genre, ..., sentence1, sentence2, label1, [label2..label5,] gold_label``.
* RTE: ``index, sentence1, sentence2, label``.

As in the reference implementation (google-research/electra ``finetune/classification``), MRPC and
STS-B training sets are doubled with the two sentences swapped (``task.double_unordered``), and QQP
rows with missing fields are skipped with a warning (as the reference and Hugging Face's GLUE
processors do; more than 1% of them is an error).

Generic files: CSV/TSV with a header, or JSON lines / a JSON list of objects; columns named by
``task.text_column`` (default ``text``), ``task.text_pair_column`` (none by default) and
``task.label_column`` (default ``label``). Labels are ``task.labels`` (comma-separated) when given, else
the training set's labels (sorted, numerically when they are all integers).

CoNLL files: one ``token ... tag`` line per word (first column the token, last the tag; tab or space
separated), a blank line between sentences, ``-DOCSTART-`` lines ignored. Tags are BIO (``O``, ``B-X``,
``I-X``); entity-level precision/recall/F1 are computed here (conlleval / seqeval default mode).

Every reading problem raises :class:`FinetuneError` naming the file and line.
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import ConfigError


class FinetuneError(ValueError):
    """A fine-tuning input that cannot be used (task file, label, model folder); the message names it."""


# --------------------------------------------------------------------------------------------
# Options of the ``task`` config section and the in-memory examples
# --------------------------------------------------------------------------------------------
@dataclass
class TaskOptions:
    """``--set task.KEY=VALUE``."""

    text_column: str = "text"
    text_pair_column: str = ""  # empty: single-sentence task
    label_column: str = "label"
    labels: str = ""  # comma-separated declared label set (classification / tagging); empty: from train
    metric: str = ""  # metric that selects the best checkpoint; empty: the task's official one
    max_seq_length: int = 0  # 0: 128 (256 for token classification, as the reference's tagging tasks)
    double_unordered: bool = True  # MRPC, STS-B: also train on (b, a) pairs, as the reference does
    train_file: str = ""  # file name inside --data-dir; empty: discover train.*
    dev_file: str = ""  # empty: discover dev.* / validation.* / valid.* (dev_matched.tsv for MNLI)

    def validate(self) -> None:
        if self.max_seq_length < 0 or 0 < self.max_seq_length < 8:
            raise ConfigError(f"task.max_seq_length must be 0 (auto) or at least 8, got {self.max_seq_length}")


@dataclass
class Example:
    """One sentence or sentence-pair example; ``label`` is a class id or a float (regression)."""

    text_a: str
    text_b: str | None
    label: int | float
    source: str = ""  # "file:line" for messages


@dataclass
class TaggedSentence:
    """One CoNLL sentence: words with a tag id per word."""

    words: list[str]
    tags: list[int]
    source: str = ""


@dataclass
class TaskSpec:
    name: str
    kind: str  # "classification" | "regression" | "token-classification"
    labels: list[str]  # label names by id (empty for regression)
    metrics: tuple[str, ...]  # reported; metrics[0] is the paper's selecting metric
    epochs: float = 3.0
    default_max_seq_length: int = 128

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.labels)


@dataclass
class TaskData:
    spec: TaskSpec
    train: list
    dev: dict[str, list]  # split name -> examples; "dev" is the one that selects the checkpoint
    files: dict[str, str] = field(default_factory=dict)
    selecting_metric: str = ""

    def __post_init__(self):
        if not self.selecting_metric:
            self.selecting_metric = self.spec.metrics[0]


# --------------------------------------------------------------------------------------------
# GLUE
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _GlueLayout:
    folder: str  # the GLUE download script's folder name
    text_a: str | int  # header name, or column index for header-less CoLA
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...]  # empty: regression
    metrics: tuple[str, ...]
    header: tuple[str, ...] | None  # None: no header line
    epochs: float = 3.0
    dev_files: tuple[tuple[str, str], ...] = (("dev", "dev.tsv"),)
    swap_pairs: bool = False  # double_unordered applies
    skip_short_rows: bool = False
    label_range: tuple[float, float] | None = None


GLUE_TASKS: dict[str, _GlueLayout] = {
    "cola": _GlueLayout("CoLA", 3, None, 1, ("0", "1"), ("mcc", "accuracy"), None),
    "sst-2": _GlueLayout("SST-2", "sentence", None, "label", ("0", "1"), ("accuracy",), ("sentence", "label")),
    "mrpc": _GlueLayout("MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), ("accuracy", "f1"),
                        ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), swap_pairs=True),
    "sts-b": _GlueLayout("STS-B", "sentence1", "sentence2", "score", (), ("spearman", "pearson"),
                         ("index", "genre", "filename", "year", "old_index", "source1", "source2",
                          "sentence1", "sentence2", "score"), epochs=10.0, swap_pairs=True, label_range=(0.0, 5.0)),
    "qqp": _GlueLayout("QQP", "question1", "question2", "is_duplicate", ("0", "1"), ("accuracy", "f1"),
                       ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"), skip_short_rows=True),
    "mnli": _GlueLayout("MNLI", "sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral"),
                        ("accuracy",), ("index", "promptID", "pairID", "genre", "sentence1", "sentence2", "gold_label"),
                        dev_files=(("dev", "dev_matched.tsv"), ("mismatched", "dev_mismatched.tsv"))),
    "qnli": _GlueLayout("QNLI", "question", "sentence", "label", ("entailment", "not_entailment"), ("accuracy",),
                        ("index", "question", "sentence", "label")),
    "rte": _GlueLayout("RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment"), ("accuracy",),
                       ("index", "sentence1", "sentence2", "label"), epochs=10.0),
}
GENERIC_TASKS = ("classification", "regression", "token-classification")
_ALIASES = {"sst2": "sst-2", "sst": "sst-2", "stsb": "sts-b", "sts": "sts-b", "mnli-m": "mnli",
            "ner": "token-classification", "tagging": "token-classification",
            "tokenclassification": "token-classification"}


def canonical_task_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, _ALIASES.get(key.replace("-", "").replace("_", ""), key))
    if key not in GLUE_TASKS and key not in GENERIC_TASKS:
        known = ", ".join([*GLUE_TASKS, *GENERIC_TASKS])
        raise FinetuneError(f"unknown task {name!r} (tasks: {known})")
    return key


def _read_lines(path: Path) -> list[str]:
    try:
        # utf-8-sig: the MRPC files of some GLUE copies start with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FinetuneError(f"{path}: not UTF-8 text ({exc})") from None
    return text.splitlines()


def _label_id(value: str, labels: Sequence[str], where: str) -> int:
    try:
        return labels.index(value)
    except ValueError:
        raise FinetuneError(
            f"{where}: label {value!r} is not one of the declared labels ({', '.join(labels)})"
        ) from None


def _float_label(value: Any, where: str, label_range: tuple[float, float] | None = None) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FinetuneError(f"{where}: regression label {value!r} is not a number") from None
    if not math.isfinite(number):
        raise FinetuneError(f"{where}: regression label {value!r} is not finite")
    if label_range is not None and not label_range[0] <= number <= label_range[1]:
        raise FinetuneError(f"{where}: score {number} is outside [{label_range[0]}, {label_range[1]}]")
    return number


def _read_glue_file(path: Path, layout: _GlueLayout, task: str) -> list[Example]:
    lines = _read_lines(path)
    if not lines:
        raise FinetuneError(f"{path}: empty file")
    start = 0
    if layout.header is None:  # CoLA: four columns, no header
        positions = (layout.text_a, layout.text_b, layout.label)
        width = 4
        first = lines[0].split("\t")
        if len(first) != width:
            raise FinetuneError(
                f"{path}:1: expected the CoLA layout (no header; source, label, original annotation, sentence), "
                f"got {len(first)} column(s) starting {lines[0][:60]!r} (a test file has no labels)"
            )
    else:
        header = lines[0].split("\t")
        missing = [name for name in layout.header if name not in header]
        if missing:
            raise FinetuneError(
                f"{path}:1: not the {task} layout: header lacks {missing} (expected columns {list(layout.header)}, "
                f"found {header}; a test file has no label column)"
            )
        positions = tuple(None if c is None else header.index(c) for c in (layout.text_a, layout.text_b, layout.label))
        width = len(header)
        start = 1
    regression = not layout.labels
    examples, skipped = [], []
    for lineno, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{path}:{lineno}"
        if len(fields) != width:
            if layout.skip_short_rows and len(fields) < width:
                skipped.append(lineno)
                continue
            raise FinetuneError(f"{where}: expected {width} tab-separated columns, found {len(fields)}")
        text_a = fields[positions[0]]
        text_b = fields[positions[1]] if positions[1] is not None else None
        raw_label = fields[positions[2]].strip()
        if regression:
            label: int | float = _float_label(raw_label, where, layout.label_range)
        else:
            label = _label_id(raw_label, layout.labels, where)
        examples.append(Example(text_a, text_b, label, where))
    if skipped:
        if len(skipped) > max(10, len(examples) // 100):
            raise FinetuneError(f"{path}: {len(skipped)} rows have missing columns (first at line {skipped[0]})")
        warnings.warn(f"{path}: skipped {len(skipped)} row(s) with missing columns (lines {skipped[:5]}...)",
                      stacklevel=2)
    if not examples:
        raise FinetuneError(f"{path}: no examples")
    return examples


def _glue_dir(data_dir: Path, layout: _GlueLayout) -> Path:
    """``--data-dir`` may be the task folder or the GLUE root holding it (glue_data/MRPC)."""
    if not (data_dir / "train.tsv").is_file() and (data_dir / layout.folder / "train.tsv").is_file():
        return data_dir / layout.folder
    return data_dir


def _load_glue(task: str, data_dir: Path, options: TaskOptions) -> TaskData:
    layout = GLUE_TASKS[task]
    folder = _glue_dir(data_dir, layout)
    train_name = options.train_file or "train.tsv"
    dev_files = (("dev", options.dev_file),) if options.dev_file else layout.dev_files
    for name in (train_name, dev_files[0][1]):  # the first dev file selects; later ones are optional
        if not (folder / name).is_file():
            raise FinetuneError(f"{folder / name}: missing ({task} needs {train_name} and {dev_files[0][1]} "
                                "in --data-dir)")
    spec = TaskSpec(task, "regression" if not layout.labels else "classification", list(layout.labels),
                    layout.metrics, layout.epochs)
    train = _read_glue_file(folder / train_name, layout, task)
    if layout.swap_pairs and options.double_unordered:
        train = train + [Example(e.text_b, e.text_a, e.label, e.source + " (swapped)") for e in train]
    present = [(split, folder / name) for split, name in dev_files if (folder / name).is_file()]
    dev = {split: _read_glue_file(path, layout, task) for split, path in present}
    files = {"train": str(folder / train_name), **{split: str(path) for split, path in present}}
    return TaskData(spec, train, dev, files)


# --------------------------------------------------------------------------------------------
# Generic classification / regression files
# --------------------------------------------------------------------------------------------
_TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
_DEV_STEMS = ("dev", "validation", "valid", "val")


def _find_file(data_dir: Path, stems: Sequence[str], suffixes: Sequence[str], explicit: str, what: str) -> Path:
    if explicit:
        path = data_dir / explicit
        if not path.is_file():
            raise FinetuneError(f"{path}: missing (task.{what}_file)")
        return path
    for stem in stems:
        for suffix in suffixes:
            if (data_dir / f"{stem}{suffix}").is_file():
                return data_dir / f"{stem}{suffix}"
    looked = ", ".join(f"{s}{x}" for s in stems for x in suffixes)
    raise FinetuneError(f"{data_dir}: no {what} file (looked for {looked}; or set task.{what}_file)")


def _read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for a CSV/TSV with a header, JSON lines or a JSON list."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        try:
            with path.open(encoding="utf-8-sig", newline="") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",",
                                        quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL)
                if reader.fieldnames is None:
                    raise FinetuneError(f"{path}: empty file (a header row naming the columns is required)")
                rows = []
                for row in reader:
                    if None in row or any(v is None for v in row.values()):
                        raise FinetuneError(f"{path}:{reader.line_num}: row has a different number of columns "
                                            f"than the header {reader.fieldnames}")
                    rows.append((reader.line_num, row))
                return rows
        except csv.Error as exc:
            raise FinetuneError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise FinetuneError(f"{path}: not UTF-8 text ({exc})") from None
    lines = _read_lines(path)
    if suffix == ".json" and lines and lines[0].lstrip().startswith("["):
        try:
            records = json.loads("\n".join(lines))
        except json.JSONDecodeError as exc:
            raise FinetuneError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        rows = list(enumerate(records, start=1))  # "line" = record number for a JSON list
    else:
        rows = []
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise FinetuneError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None
    for lineno, row in rows:
        if not isinstance(row, dict):
            raise FinetuneError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return rows


def _label_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _sorted_labels(values: set[str]) -> list[str]:
    if all(re.fullmatch(r"-?\d+", v) for v in values):
        return sorted(values, key=int)
    return sorted(values)


def _read_table(path: Path, options: TaskOptions, regression: bool) -> list[tuple[str, str | None, Any, str]]:
    rows = _read_records(path)
    if not rows:
        raise FinetuneError(f"{path}: no examples")
    columns = [options.text_column, options.label_column]
    if options.text_pair_column:
        columns.append(options.text_pair_column)
    out = []
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        missing = [c for c in columns if c not in row]
        if missing:
            raise FinetuneError(
                f"{where}: no column {', '.join(map(repr, missing))} (columns: {sorted(row)}; "
                "choose with --set task.text_column=... task.text_pair_column=... task.label_column=...)"
            )
        text_a = row[options.text_column]
        text_b = row[options.text_pair_column] if options.text_pair_column else None
        for name, text in ((options.text_column, text_a), (options.text_pair_column, text_b)):
            if text is not None and not isinstance(text, str):
                raise FinetuneError(f"{where}: column {name!r} must hold text, got {text!r}")
        label = row[options.label_column]
        if regression:
            label = _float_label(label, where)
        else:
            if label is None or (isinstance(label, str) and not label.strip()):
                raise FinetuneError(f"{where}: empty label in column {options.label_column!r}")
            label = _label_text(label)
        out.append((text_a, text_b, label, where))
    return out


def _declared_labels(options: TaskOptions) -> list[str]:
    labels = [x.strip() for x in options.labels.split(",") if x.strip()] if options.labels else []
    if len(set(labels)) != len(labels):
        raise FinetuneError(f"task.labels={options.labels!r} repeats a label")
    return labels


def _load_table_task(task: str, data_dir: Path, options: TaskOptions) -> TaskData:
    regression = task == "regression"
    train_path = _find_file(data_dir, ("train",), _TABLE_SUFFIXES, options.train_file, "train")
    dev_path = _find_file(data_dir, _DEV_STEMS, _TABLE_SUFFIXES, options.dev_file, "dev")
    train_rows = _read_table(train_path, options, regression)
    dev_rows = _read_table(dev_path, options, regression)
    if regression:
        spec = TaskSpec(task, "regression", [], ("spearman", "pearson", "mse"))
        convert = lambda rows: [Example(a, b, y, w) for a, b, y, w in rows]  # noqa: E731
    else:
        labels = _declared_labels(options) or _sorted_labels({y for _, _, y, _ in train_rows})
        if len(labels) < 2:
            raise FinetuneError(f"{train_path}: classification needs at least two labels, found {labels}")
        metrics = ("accuracy", "f1", "mcc") if len(labels) == 2 else ("accuracy",)
        spec = TaskSpec(task, "classification", labels, metrics)
        convert = lambda rows: [Example(a, b, _label_id(y, labels, w), w) for a, b, y, w in rows]  # noqa: E731
    return TaskData(spec, convert(train_rows), {"dev": convert(dev_rows)},
                    {"train": str(train_path), "dev": str(dev_path)})


# --------------------------------------------------------------------------------------------
# CoNLL token classification
# --------------------------------------------------------------------------------------------
_CONLL_SUFFIXES = (".txt", ".conll", ".bio", ".iob", ".tsv")
_BIO = re.compile(r"^(O|[BI](-.+)?)$")


def read_conll(path: Path) -> list[tuple[list[str], list[str], str]]:
    """(words, tags, "file:line") per sentence."""
    sentences, words, tags, first_line = [], [], [], 0
    for lineno, line in enumerate(_read_lines(path) + [""], start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("-DOCSTART-"):
            if words:
                sentences.append((words, tags, f"{path}:{first_line}"))
                words, tags = [], []
            continue
        fields = stripped.split("\t") if "\t" in stripped else stripped.split()
        if len(fields) < 2:
            raise FinetuneError(f"{path}:{lineno}: expected 'token ... tag' (two or more columns), got {stripped!r}")
        tag = fields[-1].strip()
        if not _BIO.match(tag):
            raise FinetuneError(f"{path}:{lineno}: tag {tag!r} is not a BIO tag (O, B-TYPE or I-TYPE)")
        if not words:
            first_line = lineno
        words.append(fields[0].strip())
        tags.append(tag)
    if not sentences:
        raise FinetuneError(f"{path}: no sentences")
    return sentences


def _tag_order(tags: set[str]) -> list[str]:
    """'O' first, then per entity type B- before I- (complete: a type seen as B-X also gets I-X)."""
    types = sorted({t[2:] if len(t) > 1 else "" for t in tags if t != "O"})
    ordered = ["O"]
    for typ in types:
        suffix = f"-{typ}" if typ else ""
        ordered += [f"B{suffix}", f"I{suffix}"]
    return ordered


def _load_conll_task(task: str, data_dir: Path, options: TaskOptions) -> TaskData:
    train_path = _find_file(data_dir, ("train",), _CONLL_SUFFIXES, options.train_file, "train")
    dev_path = _find_file(data_dir, _DEV_STEMS, _CONLL_SUFFIXES, options.dev_file, "dev")
    train_raw, dev_raw = read_conll(train_path), read_conll(dev_path)
    declared = _declared_labels(options)
    for tag in declared:
        if not _BIO.match(tag):
            raise FinetuneError(f"task.labels: {tag!r} is not a BIO tag (O, B-TYPE or I-TYPE)")
    labels = declared or _tag_order({t for _, tags, _ in train_raw for t in tags})
    if "O" not in labels:
        raise FinetuneError(f"task.labels must include 'O', got {labels}")

    def convert(raw, path):
        out = []
        for words, tags, where in raw:
            ids = []
            for offset, tag in enumerate(tags):
                if tag not in labels:
                    line = int(where.rsplit(":", 1)[1]) + offset
                    raise FinetuneError(f"{path}:{line}: tag {tag!r} is not one of the declared tags "
                                        f"({', '.join(labels)}; set task.labels to declare more)")
                ids.append(labels.index(tag))
            out.append(TaggedSentence(words, ids, where))
        return out

    spec = TaskSpec(task, "token-classification", labels, ("f1", "precision", "recall", "accuracy"),
                    default_max_seq_length=256)
    return TaskData(spec, convert(train_raw, train_path), {"dev": convert(dev_raw, dev_path)},
                    {"train": str(train_path), "dev": str(dev_path)})


def load_task(name: str, data_dir: str | Path, options: TaskOptions | None = None) -> TaskData:
    """Read a task's train and dev files from ``data_dir`` (see the module docstring for layouts)."""
    options = options or TaskOptions()
    task = canonical_task_name(name)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FinetuneError(f"{data_dir}: --data-dir is not a folder")
    if task in GLUE_TASKS:
        data = _load_glue(task, data_dir, options)
    elif task == "token-classification":
        data = _load_conll_task(task, data_dir, options)
    else:
        data = _load_table_task(task, data_dir, options)
    if options.metric:
        if options.metric not in data.spec.metrics:
            raise FinetuneError(f"task.metric={options.metric!r} is not reported for {task} "
                                f"(choose from {', '.join(data.spec.metrics)})")
        data.selecting_metric = options.metric
    return data


# --------------------------------------------------------------------------------------------
# Metrics (numpy; tests check them against scikit-learn / scipy)
# --------------------------------------------------------------------------------------------
def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    p, y = np.asarray(predictions), np.asarray(labels)
    return float((p == y).mean()) if len(y) else 0.0


def binary_f1(predictions: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (GLUE's MRPC/QQP F1); 0 when there are no true or predicted positives."""
    p, y = np.asarray(predictions) == positive, np.asarray(labels) == positive
    tp = float(np.sum(p & y))
    denominator = float(p.sum() + y.sum())
    return 2.0 * tp / denominator if denominator else 0.0


def matthews_corrcoef(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Multi-class MCC (Gorodkin's R_K), the CoLA metric; 0 when either side has a single class.

    With C the confusion matrix, s samples, c correct, t_k true and p_k predicted counts of class k:
        MCC = (c·s − Σ p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²))
    """
    p, y = np.asarray(predictions), np.asarray(labels)
    classes = np.union1d(p, y)
    t_k = np.array([(y == k).sum() for k in classes], dtype=np.float64)
    p_k = np.array([(p == k).sum() for k in classes], dtype=np.float64)
    s, c = float(len(y)), float((p == y).sum())
    denominator = math.sqrt((s * s - float(p_k @ p_k)) * (s * s - float(t_k @ t_k)))
    return (c * s - float(p_k @ t_k)) / denominator if denominator else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator else 0.0


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank (as scipy.stats.rankdata's default)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = 0.5 * (start + end - 1) + 1.0
            start = end
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of tie-averaged ranks."""
    return pearson(_average_ranks(np.asarray(x, dtype=np.float64)), _average_ranks(np.asarray(y, dtype=np.float64)))


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """BIO tags -> [(type, start, end_exclusive)], as conlleval / seqeval's default (non-strict) mode:
    an entity starts at B-X, or at I-X that does not continue an X entity (after O or another type);
    it ends before O, B-*, or a tag of another type."""
    spans, start, current = [], 0, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, label = (tag, "") if tag == "O" else (tag[0], tag[2:])
        if current is not None and (prefix in ("O", "B") or label != current):
            spans.append((current, start, i))
            current = None
        if prefix == "B" or (prefix == "I" and current is None):
            start, current = i, label
    return spans


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Micro-averaged entity-level precision/recall/F1 over sentences, plus per-type scores."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted")
    counts: dict[str, list[int]] = {}  # type -> [correct, predicted, gold]
    for sentence, (g, p) in enumerate(zip(gold, predicted)):
        if len(g) != len(p):
            raise ValueError(f"sentence {sentence}: {len(g)} gold tags but {len(p)} predicted")
        gold_spans, pred_spans = set(entity_spans(g)), set(entity_spans(p))
        for spans, slot in ((pred_spans, 1), (gold_spans, 2)):
            for span in spans:
                counts.setdefault(span[0], [0, 0, 0])[slot] += 1
        for span in gold_spans & pred_spans:
            counts[span[0]][0] += 1

    def prf(correct, n_pred, n_gold):
        precision = correct / n_pred if n_pred else 0.0
        recall = correct / n_gold if n_gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "support": n_gold}

    totals = [sum(c[i] for c in counts.values()) for i in range(3)]
    scores = prf(*totals)
    scores["per_type"] = {typ: prf(*c) for typ, c in sorted(counts.items())}
    return scores


def score(spec: TaskSpec, predictions, labels) -> dict[str, float]:
    """The task's reported metrics. ``predictions``/``labels``: class ids, floats (regression), or
    per-sentence tag-id lists (token classification)."""
    if spec.kind == "regression":
        p, y = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
        return {"spearman": spearman(p, y), "pearson": pearson(p, y), "mse": float(np.mean((p - y) ** 2))}
    if spec.kind == "token-classification":
        gold = [[spec.labels[t] for t in sentence] for sentence in labels]
        pred = [[spec.labels[t] for t in sentence] for sentence in predictions]
        scores = entity_scores(gold, pred)
        flat_gold = [t for s in labels for t in s]
        flat_pred = [t for s in predictions for t in s]
        return {"f1": scores["f1"], "precision": scores["precision"], "recall": scores["recall"],
                "accuracy": accuracy(flat_pred, flat_gold)}
    results = {"accuracy": accuracy(predictions, labels)}
    if "f1" in spec.metrics:
        results["f1"] = binary_f1(predictions, labels)
    if "mcc" in spec.metrics:
        results["mcc"] = matthews_corrcoef(predictions, labels)
    return {name: results[name] for name in spec.metrics if name in results}
