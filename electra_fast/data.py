"""Retired module name: the data code lives in ``prepare`` (the offline pipeline, with ``corpus_reader``,
``tokenizer_training`` and ``packing``), ``loader`` (the training loader) and ``manifest`` (reading a
prepared folder, ``DataError``, ``load_tokenizer``).

Kept only so the one remaining import of this name (``electra_fast/finetune.py``: ``DataError``,
``load_tokenizer``) keeps working until that module imports from ``electra_fast.manifest``; delete it then.
"""

from .manifest import DataError, load_tokenizer

__all__ = ["DataError", "load_tokenizer"]
