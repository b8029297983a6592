"""Fixed token counts for the packed layout, so that a captured graph (``train.cuda_graphs``) sees the
same few shapes every step.

    rows = bucket_rows(total_tokens, batch, seq_len)        # the smallest bucket >= total_tokens
    docs = inert_documents(batch, seq_len)                  # how many inert documents fill the gap

A packed batch has one row per real token, a count that changes every step: a CUDA graph (and a
statically compiled graph) is recorded for one shape, so every new count would mean a new capture. Here
the count is rounded up to one of ``count`` buckets: the multiples of a granule ``g = ceil(B·S / count)``
(rounded up to 8 rows, which keeps matmul row counts aligned), the last one capped at B·S. The rows past
the real tokens form up to ``inert_documents`` extra sequences of at most ``seq_len`` rows each, so the
attention kernel's grid (``max_seqlen = seq_len``) covers them and they cost what real tokens cost; they
attend only among themselves and no loss or statistic reads them (see
:class:`electra_fast.model.TokenLayout`). What the rounding costs in tokens on the default corpus is in
the README.

Everything here is host arithmetic on Python ints: nothing waits for the device.
"""

from __future__ import annotations

# Buckets per (batch, seq_len). A batch lands in the bucket just above its token count, and the counts of
# one dataset cluster (a sum of B lengths), so a run meets only the few buckets around that cluster; the
# granule B·S/32 adds fewer than B·S/32 rows to any batch. Measured on the default corpus (README,
# benchmarks/bucket_padding.py): ELECTRA-Small's 128 x 128 batches gain 1.8% rows on average and meet 5
# buckets (16 buckets: 3.6% and 3; 64: 0.9% and 9).
DEFAULT_BUCKETS = 32
ROW_ALIGN = 8


def bucket_granule(batch: int, seq_len: int, count: int = DEFAULT_BUCKETS) -> int:
    """The spacing of the buckets: ceil(B·S / count), rounded up to a multiple of ``ROW_ALIGN``."""
    if batch <= 0 or seq_len <= 0 or count <= 0:
        raise ValueError(f"token buckets need batch, seq_len and count > 0, got {batch}, {seq_len}, {count}")
    granule = -(-batch * seq_len // count)
    return -(-granule // ROW_ALIGN) * ROW_ALIGN


def token_buckets(batch: int, seq_len: int, count: int = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """Every row count a packed (batch, seq_len) batch can be given, ascending; the last is B·S."""
    granule, slots = bucket_granule(batch, seq_len, count), batch * seq_len
    return tuple(sorted({min(j * granule, slots) for j in range(1, count + 1)}))


def bucket_rows(total_tokens: int, batch: int, seq_len: int, count: int = DEFAULT_BUCKETS) -> int:
    """The smallest bucket that holds ``total_tokens`` real tokens."""
    slots = batch * seq_len
    if not 0 <= total_tokens <= slots:
        raise ValueError(f"total_tokens {total_tokens} is outside [0, batch * seq_len = {slots}]")
    granule = bucket_granule(batch, seq_len, count)
    return min(max(1, -(-total_tokens // granule)) * granule, slots)


def inert_documents(batch: int, seq_len: int, count: int = DEFAULT_BUCKETS) -> int:
    """How many inert sequences (each at most ``seq_len`` rows, some possibly empty) fill any bucket.

    A batch's bucket is less than one granule above its token count (the first bucket is one granule
    above zero), so ceil(granule / seq_len) sequences of ``seq_len`` rows always reach it. The number is
    the same for every bucket, which keeps ``cu_seqlens`` at one shape (batch + 1 + this)."""
    return -(-bucket_granule(batch, seq_len, count) // seq_len)
