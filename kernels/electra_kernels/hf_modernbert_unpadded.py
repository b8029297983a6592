"""A patched transformers ``ModernBertModel`` that runs its encoder on the real tokens only.

transformers' ModernBERT (5.x) keeps the (batch, seq) layout through every layer: padding tokens go
through the embeddings, every Wqkv / Wo / Wi projection, every norm and the attention kernel, and only
flash-attn's wrapper unpads around attention itself. :func:`install` replaces the model's ``forward``
(on the instance; the class, parameters, hooks and state dict are untouched) with one that

1. finds every row's real tokens (one small device-to-host copy: per-row length, first real column and
   number of runs; transformers' own flash-attn path also syncs here),
2. gathers them into one packed (1, total_tokens, hidden) sequence *before* the embeddings,
3. runs every layer on it, attention through the varlen kernels (``cu_seqlens``: no window or softmax
   crosses from one row into the next), rotary q/k at each token's own position,
4. scatters the final states back into (batch, seq, hidden), zeros at the padding positions (what
   transformers 4.x's unpadded ModernBERT returned; a padding position's state means nothing).

Rotary embeddings: transformers' own cos/sin (any rope type) at the positions it would use (``position_ids``
or 0..seq-1). When the batch shares one position row and every row starts at column 0 (right padding, the
tokenizers' default), a token's offset inside its row is its column, so the fused rotary-attention kernels
index that row's table by offset (no rotated copy of q, k). Otherwise (left padding, per-row position_ids,
GPUs where the separate rotary kernel is used) each token's cos/sin row is gathered and the rotary kernel
rotates q and k before the varlen attention.

The padded path (the patched attention with a key-padding mask) still runs when unpadding cannot help or
cannot be exact: no mask, a mask with no padding, a mask with holes inside a row (positions and windows
are column distances there, and packing would shorten them), a 4-D or per-layer-type mask.

``output_hidden_states`` returns every state re-padded to (batch, seq, hidden), as transformers does
(embeddings output, each layer's output, the last one after ``final_norm``); ``output_attentions`` is
refused (the kernels never form the probabilities).
"""

from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn as nn

# transformers' flash-attn keyword names for an already packed batch (DataCollatorWithFlattening).
_PACKED_KEYS = ("cu_seq_lens_q", "max_length_q")


class Unpadding:
    """Where the real tokens of a (batch, seq) padding mask are, computed once per forward.

    indices: (total_tokens,) flat positions ``row * seq + column`` of the real tokens, in order, on the
    mask's device; cu_seqlens: (batch + 1,) int32 prefix sums of the row lengths, same device;
    max_seqlen: the longest row (host int); right_aligned: every non-empty row starts at column 0.
    """

    def __init__(self, indices, cu_seqlens, max_seqlen: int, batch: int, seq: int, right_aligned: bool):
        self.indices, self.cu_seqlens, self.max_seqlen = indices, cu_seqlens, max_seqlen
        self.batch, self.seq, self.right_aligned = batch, seq, right_aligned

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> Optional["Unpadding"]:
        """The unpadding of a 2-D mask (True / nonzero = real token), or None when the padded path should
        run instead: no padding at all, or a row whose real tokens are not one contiguous run."""
        keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
        batch, seq = keep.shape
        lengths = keep.sum(dim=1)
        runs = keep[:, :1].sum(dim=1) + (keep[:, 1:] & ~keep[:, :-1]).sum(dim=1)  # starts of runs of 1s
        first = keep.int().argmax(dim=1)
        lengths, runs, first = torch.stack((lengths, runs, first)).cpu().tolist()  # the one host sync
        if sum(lengths) == batch * seq or any(r > 1 for r in runs):
            return None
        starts = [b * seq + (f if n else 0) for b, (f, n) in enumerate(zip(first, lengths))]
        indices = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)]) if batch else \
            torch.zeros(0, dtype=torch.long)
        cu = torch.zeros(batch + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
        device = attention_mask.device
        return cls(indices.to(device, non_blocking=True), cu.to(device, non_blocking=True),
                   max(lengths, default=0), batch, seq,
                   right_aligned=all(f == 0 for f, n in zip(first, lengths) if n))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, ...) -> (1, total_tokens, ...): the real tokens packed into one row."""
        return x.reshape(self.batch * self.seq, *x.shape[2:]).index_select(0, self.indices)[None]

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """(1, total_tokens, hidden) -> (batch, seq, hidden), zeros at the padding positions."""
        flat = x.new_zeros(self.batch * self.seq, x.shape[-1]).index_copy(0, self.indices, x[0])
        return flat.view(self.batch, self.seq, x.shape[-1])


def install(model: nn.Module) -> None:
    """Replace ``model.forward`` (a ``ModernBertModel``) with the unpadded one; idempotent."""
    if getattr(model.forward, "__func__", None) is not unpadded_forward:
        model.forward = types.MethodType(unpadded_forward, model)


def unpadded_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
    """``ModernBertModel.forward`` on the real tokens only (see the module docstring)."""
    if kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)):
        raise ValueError("electra_kernels attention never materialises attention probabilities: "
                         "output_attentions=True is not supported on a patched model")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    batch_input = input_ids if input_ids is not None else inputs_embeds
    batch, seq = batch_input.shape[:2]

    packed = all(kwargs.get(name) is not None for name in _PACKED_KEYS)
    unpadding = None
    if not packed and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not match the input "
                             f"({batch}, {seq})")
        unpadding = Unpadding.from_mask(attention_mask)
    if unpadding is None and not packed:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    inputs_embeds=inputs_embeds, **kwargs)

    return_dict = kwargs.pop("return_dict", getattr(self.config, "return_dict", True))
    hidden_wanted = kwargs.pop("output_hidden_states", getattr(self.config, "output_hidden_states", False))
    if packed:  # (1, total) already, documents delimited by the caller's cu_seq_lens_q
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q describes one packed row; got a batch of {batch} rows")
        cu_seqlens = kwargs["cu_seq_lens_q"].to(device=batch_input.device, dtype=torch.int32)
        max_seqlen, right_aligned = int(kwargs["max_length_q"]), False
        tokens = batch_input
    else:
        cu_seqlens, max_seqlen, right_aligned = unpadding.cu_seqlens, unpadding.max_seqlen, unpadding.right_aligned
        tokens = unpadding.gather(batch_input)
    if input_ids is not None:
        hidden = self.embeddings(input_ids=tokens)
    else:
        hidden = self.embeddings(inputs_embeds=tokens)

    rotary = {}
    for layer_type in set(self.config.layer_types):
        rotary[layer_type] = _token_cos_sin(self, hidden, position_ids, seq, layer_type, unpadding, right_aligned,
                                            max_seqlen, packed)
    states = [hidden] if hidden_wanted else None
    for layer in self.layers:
        per_token, table = rotary[layer.attention_type]
        hidden = layer(hidden, attention_mask=None, position_embeddings=per_token, cu_seqlens=cu_seqlens,
                       max_seqlen=max_seqlen, rotary_table=table)
        if states is not None:
            states.append(hidden)
    hidden = self.final_norm(hidden)

    repad = (lambda x: x) if packed else unpadding.scatter
    from transformers.modeling_outputs import BaseModelOutput

    out = BaseModelOutput(last_hidden_state=repad(hidden))
    if states is not None:
        states[-1] = hidden  # transformers ties the last entry to last_hidden_state (after final_norm)
        out.hidden_states = tuple(repad(s) for s in _selected(states, hidden_wanted))
    return out if return_dict else out.to_tuple()


def _selected(states: list, wanted) -> list:
    """transformers' ``output_hidden_states`` may be a bool or the index / indices of the states to keep."""
    if isinstance(wanted, bool):
        return states
    indices = [wanted] if isinstance(wanted, int) else list(wanted)
    n = len(states)
    keep = {i % n for i in indices if -n <= i < n}
    return [s for i, s in enumerate(states) if i in keep]


def _token_cos_sin(model, hidden, position_ids, seq: int, layer_type: str, unpadding, right_aligned: bool,
                   max_seqlen: int, packed: bool):
    """((cos, sin) per packed token, each (1, total_tokens, head_dim), and the (cos, sin) table the fused
    kernels may index by in-row offset, (max_seqlen, head_dim / 2) fp32, or None where offsets are not the
    positions). Both from transformers' rotary module at the positions the padded model would use."""
    if position_ids is None:
        position_ids = torch.arange(seq, device=hidden.device)[None]
    cos, sin = model.rotary_emb(hidden, position_ids, layer_type)  # (1 or batch, seq, head_dim)
    if packed:
        return (cos, sin), None
    table = None
    if cos.shape[0] == 1 and right_aligned:
        half = cos.shape[-1] // 2
        table = tuple(t[0, :max_seqlen, :half].float().contiguous() for t in (cos, sin))
    if cos.shape[0] == 1:
        columns = unpadding.indices % seq
        per_token = tuple(t[0].index_select(0, columns)[None] for t in (cos, sin))
    else:
        per_token = tuple(unpadding.gather(t.expand(unpadding.batch, -1, -1)) for t in (cos, sin))
    return per_token, table
