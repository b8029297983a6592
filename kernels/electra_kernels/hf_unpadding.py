"""Running a patched Hugging Face encoder on its real tokens only: what the BERT-family and ModernBERT
unpadded forwards (hf_bert_unpadded.py, hf_modernbert_unpadded.py) share.

transformers keeps the (batch, seq) layout through every layer, so padding tokens pay for every
projection, norm and MLP. An unpadded forward finds each row's real tokens once (one small
device-to-host copy, as transformers' own flash-attn path makes), packs them into one
(1, total_tokens, hidden) row, runs the layers on it (attention through the varlen kernels, delimited by
``cu_seqlens`` so nothing crosses from one row into the next) and scatters the result back to
(batch, seq, hidden) with zeros at the padding positions (a padding position's state means nothing;
transformers 4.x's unpadded ModernBERT returned zeros there too).

The padded layout stays where unpadding would not help or not be exact: no mask, no padding, a row whose
real tokens are not one contiguous run (positions and windows are column distances there), and inside
``torch.compile`` (the host copy would break the graph; a compiled model runs the padded kernels).
"""

from __future__ import annotations

import inspect
import types
from typing import Optional

import torch
import torch.nn as nn

from .bert_padding import index_first_axis, index_put_first_axis


class Unpadding:
    """Where the real tokens of a (batch, seq) padding mask are.

    indices: (total_tokens,) flat positions ``row * seq + column`` of the real tokens, in order, on the
    mask's device; cu_seqlens: (batch + 1,) int32 prefix sums of the row lengths, same device;
    max_seqlen: the longest row (host int); right_aligned: every non-empty row starts at column 0.
    """

    def __init__(self, indices, cu_seqlens, max_seqlen: int, batch: int, seq: int, right_aligned: bool):
        self.indices, self.cu_seqlens, self.max_seqlen = indices, cu_seqlens, max_seqlen
        self.batch, self.seq, self.right_aligned = batch, seq, right_aligned

    @classmethod
    def from_mask(cls, attention_mask, batch: int, seq: int) -> Optional["Unpadding"]:
        """The unpadding of a 2-D (batch, seq) mask (True / nonzero = real token), or None when the padded
        layout should run instead (see the module docstring)."""
        if (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2
                or torch.compiler.is_compiling()):
            return None
        if tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not match the input "
                             f"({batch}, {seq})")
        keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
        lengths = keep.sum(dim=1)
        runs = keep[:, :1].sum(dim=1) + (keep[:, 1:] & ~keep[:, :-1]).sum(dim=1)  # starts of runs of 1s
        first = keep.int().argmax(dim=1)
        lengths, runs, first = torch.stack((lengths, runs, first)).cpu().tolist()  # the one host sync
        if sum(lengths) == batch * seq or any(r > 1 for r in runs):
            return None
        starts = torch.tensor([b * seq + (f if n else 0) for b, (f, n) in enumerate(zip(first, lengths))])
        counts = torch.tensor(lengths)
        # Row b's real tokens are starts[b], starts[b] + 1, ..., starts[b] + lengths[b] - 1.
        offsets = torch.arange(int(counts.sum())) - (counts.cumsum(0) - counts).repeat_interleave(counts)
        indices = starts.repeat_interleave(counts) + offsets
        cu = torch.zeros(batch + 1, dtype=torch.int32)
        cu[1:] = counts.cumsum(0)
        device = attention_mask.device
        return cls(indices.to(device, non_blocking=True), cu.to(device, non_blocking=True),
                   max(lengths, default=0), batch, seq,
                   right_aligned=all(f == 0 for f, n in zip(first, lengths) if n))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, ...) -> (1, total_tokens, ...): the real tokens packed into one row."""
        return index_first_axis(x.reshape(self.batch * self.seq, *x.shape[2:]), self.indices)[None]

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """(1, total_tokens, ...) -> (batch, seq, ...), zeros at the padding positions."""
        flat = index_put_first_axis(x[0], self.indices, self.batch * self.seq)
        return flat.view(self.batch, self.seq, *x.shape[2:])


class UnpaddedForward:
    """``model.forward`` on a patched instance: calls ``function(model, ...)``.

    An object rather than a bound method so that a patched model pickles (``torch.save(model)``,
    multiprocessing): a bound method pickles as ``getattr(model, function.__name__)``, a name the instance
    does not have. It pickles as (the model, the module-level function), and shows the function's
    signature to ``inspect``."""

    def __init__(self, model: nn.Module, function):
        self.__self__, self.__func__ = model, function
        self.__signature__ = inspect.signature(types.MethodType(function, model))
        self.__doc__ = function.__doc__

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return (UnpaddedForward, (self.__self__, self.__func__))

    def __repr__(self) -> str:
        function = f"{self.__func__.__module__}.{self.__func__.__qualname__}"
        return f"<unpadded forward {function} of {type(self.__self__).__name__}>"


def install(model: nn.Module, forward) -> bool:
    """Make ``forward`` (a function of (model, ...)) the instance's forward; the class, parameters, hooks
    and state dict are untouched and ``type(model).forward`` stays transformers' own (the padded path).
    False when it was installed already."""
    if getattr(model.forward, "__func__", None) is forward:
        return False
    model.forward = UnpaddedForward(model, forward)
    return True


def refuse_attentions(model: nn.Module, kwargs: dict) -> None:
    if kwargs.get("output_attentions", getattr(model.config, "output_attentions", False)):
        raise ValueError("electra_kernels attention never materialises attention probabilities: "
                         "output_attentions=True is not supported on a patched model")


def output_flags(model: nn.Module, kwargs: dict):
    """(return_dict, output_hidden_states) as transformers resolves them (the call's, else the config's);
    both are popped from kwargs."""
    return_dict = kwargs.pop("return_dict", getattr(model.config, "return_dict", True))
    hidden = kwargs.pop("output_hidden_states", getattr(model.config, "output_hidden_states", False))
    return (True if return_dict is None else return_dict), hidden


def selected_states(states: list, wanted) -> list:
    """transformers' ``output_hidden_states`` is a bool or the index / indices of the states to keep."""
    if isinstance(wanted, bool):
        return states
    indices = [wanted] if isinstance(wanted, int) else list(wanted)
    n = len(states)
    keep = {i % n for i in indices if -n <= i < n}
    return [s for i, s in enumerate(states) if i in keep]
