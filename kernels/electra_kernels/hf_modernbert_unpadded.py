"""A patched transformers ``ModernBertModel`` that runs its encoder on the real tokens only
(hf_unpadding.py says how and when; ``patch_hf(..., unpad=False)`` turns it off).

The real tokens of every row are packed into one (1, total_tokens) row *before* the embeddings, every
layer runs on it (attention through the varlen kernels, no window or softmax crossing rows), and the final
states are scattered back to (batch, seq, hidden).

Rotary embeddings: transformers' own cos/sin (any rope type) at the positions it would use (``position_ids``
or 0..seq-1). When the batch shares one position row and every row starts at column 0 (right padding, the
tokenizers' default), a token's offset inside its row is its column, so the fused rotary-attention kernels
index that row's table by offset (no rotated copy of q, k). Otherwise (left padding, per-row position_ids,
GPUs where the separate rotary kernel is used) each token's cos/sin row is gathered and the rotary kernel
rotates q and k before the varlen attention.

An already packed row given with transformers' flattened-batch keywords (``cu_seq_lens_q``,
``max_length_q``; DataCollatorWithFlattening) runs as it is, its documents kept apart.

``output_hidden_states`` returns every state re-padded to (batch, seq, hidden), as transformers does
(embeddings output, each layer's output, the last one after ``final_norm``); ``output_attentions`` is
refused (the kernels never form the probabilities).
"""

from __future__ import annotations

import torch

from .hf_patch_modernbert import rotary_table
from .hf_unpadding import Unpadding, output_flags, refuse_attentions, selected_states

# transformers' flash-attn keyword names for an already packed batch (DataCollatorWithFlattening).
_PACKED_KEYS = ("cu_seq_lens_q", "max_length_q")


def unpadded_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
    """``ModernBertModel.forward`` on the real tokens only (see the module docstring)."""
    refuse_attentions(self, kwargs)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    batch_input = input_ids if input_ids is not None else inputs_embeds
    batch, seq = batch_input.shape[:2]

    packed = all(kwargs.get(name) is not None for name in _PACKED_KEYS)
    unpadding = None if packed else Unpadding.from_mask(attention_mask, batch, seq)
    if unpadding is None and not packed:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    inputs_embeds=inputs_embeds, **kwargs)

    return_dict, hidden_wanted = output_flags(self, kwargs)
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
        out.hidden_states = tuple(repad(s) for s in selected_states(states, hidden_wanted))
    return out if return_dict else out.to_tuple()


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
    table = rotary_table(cos, sin, max_seqlen) if cos.shape[0] == 1 and right_aligned else None
    if cos.shape[0] == 1:
        columns = unpadding.indices % seq
        per_token = tuple(t[0].index_select(0, columns)[None] for t in (cos, sin))
    else:
        per_token = tuple(unpadding.gather(t.expand(unpadding.batch, -1, -1)) for t in (cos, sin))
    return per_token, table
