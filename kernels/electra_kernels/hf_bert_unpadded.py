"""A patched transformers ``BertModel`` / ``RobertaModel`` / ``ElectraModel`` that runs its encoder on
the real tokens only (hf_unpadding.py says how and when; ``patch_hf(..., unpad=False)`` turns it off).

The embeddings run as transformers runs them, on the padded batch (so RoBERTa's padding-derived
positions, token types and ELECTRA's ``embeddings_project`` are exactly its own; one LayerNorm over the
padding is all it costs), then the real tokens are packed into one (1, total_tokens, hidden) row and
every ``*Layer`` runs on it: the attention function registered by patch_hf receives ``cu_seqlens`` /
``max_seqlen`` and calls :func:`electra_kernels.attention_varlen`, and the projections, bias-GELU and
dropout-add-LayerNorm kernels see no padding. The last layer's output is scattered back to
(batch, seq, hidden), zeros at the padding positions, and the pooler (BERT, RoBERTa) reads it as usual.

``output_hidden_states``: every state re-padded, as transformers returns them (the first layer's input,
then each layer's output). Decoder inputs (``encoder_hidden_states``, a cache) never reach here: patch_hf
refuses decoder configurations.
"""

from __future__ import annotations

from .hf_unpadding import Unpadding, output_flags, refuse_attentions, selected_states

# Inputs only a decoder or a cache uses; with any of them the padded forward runs (and refuses).
_DECODER_KEYS = ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values")


def unpadded_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                     inputs_embeds=None, **kwargs):
    """``BertModel.forward`` (and RoBERTa's, ELECTRA's) on the real tokens only."""
    refuse_attentions(self, kwargs)
    batch_input = input_ids if input_ids is not None else inputs_embeds
    unpadding = None
    if batch_input is not None and not any(kwargs.get(key) is not None for key in _DECODER_KEYS):
        unpadding = Unpadding.from_mask(attention_mask, *batch_input.shape[:2])
    if unpadding is None:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids, position_ids=position_ids,
                                  inputs_embeds=inputs_embeds, **kwargs)

    return_dict, hidden_wanted = output_flags(self, kwargs)
    kwargs.pop("use_cache", None)
    embedded = self.embeddings(input_ids=input_ids, position_ids=position_ids, token_type_ids=token_type_ids,
                               inputs_embeds=inputs_embeds)
    if hasattr(self, "embeddings_project"):  # ELECTRA with embedding_size != hidden_size
        embedded = self.embeddings_project(embedded)
    hidden = unpadding.gather(embedded)
    states = [hidden] if hidden_wanted else None
    for layer in self.encoder.layer:
        # Positional (hidden, mask, encoder states) as transformers' encoder calls it (gradient checkpointing).
        hidden = layer(hidden, None, None, cu_seqlens=unpadding.cu_seqlens, max_seqlen=unpadding.max_seqlen)
        if states is not None:
            states.append(hidden)
    sequence_output = unpadding.scatter(hidden)

    from transformers.modeling_outputs import BaseModelOutputWithCrossAttentions, \
        BaseModelOutputWithPoolingAndCrossAttentions

    if hasattr(self, "pooler"):  # BERT, RoBERTa (pooler may be None: add_pooling_layer=False)
        out = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=sequence_output,
            pooler_output=self.pooler(sequence_output) if self.pooler is not None else None)
    else:
        out = BaseModelOutputWithCrossAttentions(last_hidden_state=sequence_output)
    if states is not None:
        out.hidden_states = tuple(unpadding.scatter(s) for s in selected_states(states, hidden_wanted))
    return out if return_dict else out.to_tuple()
