"""The training loader of a prepared dataset: endless, rank-sharded, seeded and resumable.

    loader = PretrainingLoader("data/owt", micro_batch_size=128, rank=rank, world_size=world, seed=1234)
    for batch in loader:   # {"input_ids", "token_type_ids", "attention_mask"}: int64 (B, S), forever
        out = model(ids, mask, types, **batch["packed_sizes"])   # + the packed layout's sizes (host ints)
    state = loader.state_dict()   # {"epoch", "position", ...}; load_state_dict(state) resumes exactly
"""

from __future__ import annotations

import itertools
import logging
import signal
import sys
from typing import Any, Iterator

import numpy as np
import torch

from .manifest import FORMAT_VERSION, DataError, load_examples, read_manifest
from .model import packed_sizes

logger = logging.getLogger(__name__)


class EpochPermutation:
    """A seeded pseudo-random permutation of ``range(n)``, evaluated per index in O(1) memory.

    A full ``np.random.permutation(n)`` is 8n bytes in every loader worker (400 MB each for 50M
    examples). This is a Feistel network on the smallest power-of-two domain 2^b >= n (so < 2n):
    each round maps (hi, lo) -> (lo, hi XOR F(lo)), a bijection whatever F is; with b odd the two
    halves differ by a bit and swap widths every round, so an even number of rounds returns to the
    original layout. Restricting it to [0, n) by cycle walking (apply it again until the value is in
    range) keeps it a bijection; fewer than two steps are needed on average. Round keys come from
    ``SeedSequence([seed, epoch])``, so every rank and worker computes the same order.
    """

    ROUNDS = 4  # even; 4 rounds of a pseudo-random F give a pseudo-random permutation (Luby-Rackoff)

    def __init__(self, n: int, seed: int, epoch: int):
        if n <= 0:
            raise ValueError("cannot permute an empty range")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.hi_bits, self.lo_bits = (bits + 1) // 2, bits // 2
        self.keys = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)]).generate_state(
            self.ROUNDS, dtype=np.uint64)

    @staticmethod
    def _mix(z: np.ndarray) -> np.ndarray:
        # splitmix64's finaliser: a cheap, well-tested 64-bit avalanche (uint64 arithmetic wraps).
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        hi_bits, lo_bits = self.hi_bits, self.lo_bits
        hi, lo = x >> np.uint64(lo_bits), x & np.uint64((1 << lo_bits) - 1)
        for key in self.keys:
            hi, lo = lo, hi ^ (self._mix(lo ^ key) & np.uint64((1 << hi_bits) - 1))
            hi_bits, lo_bits = lo_bits, hi_bits
        return (hi << np.uint64(lo_bits)) | lo

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        values = self._encrypt(np.asarray(positions, dtype=np.uint64))
        outside = np.flatnonzero(values >= self.n)
        while len(outside):
            values[outside] = self._encrypt(values[outside])
            outside = outside[values[outside] >= self.n]
        return values.astype(np.int64)


_BATCH_COLUMNS = ("input_ids", "token_type_ids", "attention_mask")


class _RowGather:
    """Rows by index from the memory-mapped Arrow record batches, as numpy views (no copy of the data).

    ``Dataset.__getitem__`` with a list of indices formats row by row (~20 ms per 128 rows here), and
    pyarrow's ``take`` on a chunked column concatenates every chunk first, which costs the whole
    dataset per batch. Here each record batch's fixed-size-list column is viewed as a (rows, seq_len)
    array over the mapped file, and a batch is gathered with one fancy index per record batch touched.
    """

    def __init__(self, dataset, seq_len: int):
        table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
        self.batches = table.to_batches()
        self.offsets = np.cumsum([0] + [batch.num_rows for batch in self.batches])
        self.seq_len = seq_len
        self._views: dict[int, dict[str, np.ndarray]] = {}

    def _view(self, index: int) -> dict[str, np.ndarray]:
        if index not in self._views:
            batch = self.batches[index]
            self._views[index] = {
                name: batch.column(name).flatten().to_numpy(zero_copy_only=True).reshape(-1, self.seq_len)
                for name in _BATCH_COLUMNS}
        return self._views[index]

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        batch_of_row = np.searchsorted(self.offsets, rows, side="right") - 1
        out = {name: np.empty((len(rows), self.seq_len), dtype=np.int64) for name in _BATCH_COLUMNS}
        for index in np.unique(batch_of_row):
            chosen = np.flatnonzero(batch_of_row == index)
            local = rows[chosen] - self.offsets[index]
            view = self._view(int(index))
            for name in _BATCH_COLUMNS:
                out[name][chosen] = view[name][local]
        return out


class _RankBatches(torch.utils.data.Dataset):
    """Item k = this rank's k-th micro-batch after stream position ``start`` (a map-style dataset, so
    DataLoader workers can build batches in any order and the loader still yields them in order).

    The sample stream is epoch 0's permutation, then epoch 1's, ... Global batch k covers stream
    positions [start + k·G, start + (k+1)·G) with G = micro_batch_size · world_size; rank r takes the
    r-th slice of B. Ranks are thus disjoint, each epoch is covered exactly once, every rank gets the
    same count, and a global batch may straddle an epoch boundary instead of dropping or repeating.
    """

    def __init__(self, dataset, num_examples: int, seed: int, rank: int, world_size: int, micro_batch_size: int,
                 start: int, seq_len: int = 0):
        self.dataset = dataset
        self.seq_len = seq_len
        self.num_examples = num_examples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.start = start
        self._permutations: dict[int, EpochPermutation] = {}
        self._gather: _RowGather | None = None  # built in each worker process, never pickled

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_gather": None}

    def example_ids(self, k: int) -> np.ndarray:
        global_batch = self.micro_batch_size * self.world_size
        first = self.start + k * global_batch + self.rank * self.micro_batch_size
        positions = np.arange(first, first + self.micro_batch_size, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_examples)
        ids = np.empty_like(positions)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            ids[chosen] = self._permutation(int(epoch))(within[chosen])
        return ids

    def _permutation(self, epoch: int) -> EpochPermutation:
        if epoch not in self._permutations:
            if len(self._permutations) > 4:
                self._permutations.clear()
            self._permutations[epoch] = EpochPermutation(self.num_examples, self.seed, epoch)
        return self._permutations[epoch]

    def __getitem__(self, k: int) -> dict[str, Any]:
        if self._gather is None:
            self._gather = _RowGather(self.dataset, self.seq_len)
        rows = self._gather(self.example_ids(k))
        batch: dict[str, Any] = {name: torch.from_numpy(values) for name, values in rows.items()}
        # The packed layout's sizes, read here from the host copy of the mask: the model would otherwise
        # read them from the device copy, two host-device synchronisations in every step.
        batch["packed_sizes"] = packed_sizes(batch["attention_mask"])
        return batch

    def __len__(self) -> int:  # the stream is endless; DataLoader only needs a number
        return sys.maxsize


class _Forever(torch.utils.data.Sampler):
    def __iter__(self) -> Iterator[int]:
        return itertools.count()


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the training process, which finishes its step (with
    batches from them) before it stops; they end with it. A Ctrl-C reaches every process of the
    terminal's group, and torch's workers would otherwise exit on it mid-step."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


class PretrainingLoader:
    """Endless, rank-sharded, seeded, resumable batches of a prepared dataset (masking happens on device).

    Each yielded batch is ``{"input_ids", "token_type_ids", "attention_mask"}``, int64 of shape
    (micro_batch_size, seq_len), in pinned memory when CUDA is available, prepared ahead by
    ``num_workers`` DataLoader processes reading the memory-mapped Arrow files, plus
    ``"packed_sizes"``: ``{"max_seqlen", "total_tokens"}`` as Python ints
    (:func:`electra_fast.model.packed_sizes`), the keywords the model's forward takes so that its
    packed layout needs no host-device synchronisation. See :class:`_RankBatches` for which examples
    each rank gets.

    ``state_dict()`` records the stream position after the last batch handed out (every rank holds
    the same one); a loader given it with ``load_state_dict`` yields exactly the batches an
    uninterrupted loader would have, across epoch boundaries too. The position is counted in examples,
    so a run may even resume on a different number of ranks.
    """

    def __init__(self, data_dir: str, *, micro_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 2, prefetch_factor: int = 4, pin_memory: bool = True):
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.manifest = read_manifest(data_dir)
        self.data_dir = str(data_dir)
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_workers = max(0, num_workers)
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._dataset = load_examples(data_dir, self.manifest)
        if len(self._dataset) != self.manifest["num_examples"]:
            raise DataError(f"{data_dir}: the dataset has {len(self._dataset)} examples but the manifest says "
                            f"{self.manifest['num_examples']}; prepare it again")
        if len(self._dataset) == 0:
            raise DataError(f"{data_dir}: the dataset is empty")
        self._position = 0  # examples of the global stream handed out so far (all ranks together)
        self._generation = 0

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def num_examples(self) -> int:
        return int(self.manifest["num_examples"])

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank in one pass over the data (rounded down; batches run across epochs)."""
        return max(1, self.num_examples // self.global_batch_size)

    @property
    def epoch(self) -> int:
        return self._position // self.num_examples

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._position // self.num_examples, "position": self._position % self.num_examples,
                "num_examples": self.num_examples, "seed": self.seed, "format_version": FORMAT_VERSION}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_examples") != self.num_examples:
            raise DataError(f"the loader state was saved on a dataset of {state.get('num_examples')} examples, but "
                            f"{self.data_dir} has {self.num_examples}: resume with the same prepared data")
        if state.get("seed") != self.seed:
            raise DataError(f"the loader state was saved with seed {state.get('seed')}, this loader has seed "
                            f"{self.seed}: the example order would differ")
        self._position = int(state["epoch"]) * self.num_examples + int(state["position"])
        self._generation += 1  # an iterator made before this point would continue from the old position

    def _batches(self, start: int) -> torch.utils.data.DataLoader:
        batches = _RankBatches(self._dataset, self.num_examples, self.seed, self.rank, self.world_size,
                               self.micro_batch_size, start, self.seq_len)
        workers = self.num_workers
        # A generator of its own: without one, DataLoader draws its workers' base seed from torch's global
        # CPU generator whenever iteration starts, which would shift the training's random streams
        # (dropout) by when a run was started or resumed.
        return torch.utils.data.DataLoader(
            batches, batch_size=None, sampler=_Forever(), num_workers=workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers else None, persistent_workers=False,
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=_ignore_stop_signals if workers else None)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        generation = self._generation
        for batch in self._batches(self._position):
            if generation != self._generation:
                raise RuntimeError("load_state_dict() was called while iterating; start a new iteration")
            self._position += self.global_batch_size
            yield batch


def heldout_batches(data_dir: str, *, batch_size: int, max_batches: int,
                    manifest: dict[str, Any] | None = None) -> list[dict[str, torch.Tensor]]:
    """The fixed evaluation sample: the first ``max_batches`` batches of ``batch_size`` held-out examples,
    in the order prepare wrote them (the last batch may be smaller), as int64 tensors on the CPU.

    Every call and every rank gets the same batches, so evaluations at different steps (and on
    different ranks) score the same tokens. [] when the data has no held-out split.
    """
    if batch_size <= 0 or max_batches < 0:
        raise ValueError(f"batch_size must be positive and max_batches >= 0, got {batch_size} and {max_batches}")
    manifest = read_manifest(data_dir) if manifest is None else manifest
    examples = load_examples(data_dir, manifest, split="heldout")
    if examples is None or max_batches == 0:
        return []
    count = min(len(examples), batch_size * max_batches)
    gather = _RowGather(examples, int(manifest["seq_len"]))
    rows = gather(np.arange(count, dtype=np.int64))
    return [{name: torch.from_numpy(rows[name][start:start + batch_size]) for name in _BATCH_COLUMNS}
            for start in range(0, count, batch_size)]
