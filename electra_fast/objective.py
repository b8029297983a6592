"""The ELECTRA objective, as in the reference implementation (google-research/electra).

Per step, on the device:
1. choose positions: round(mask_prob x real tokens) per sequence (at least 1, at most
   max_predictions_per_seq), uniformly among real tokens that are not [CLS]/[SEP]/[PAD];
2. of those, ``mask_token_ratio`` (85%) become [MASK] in the generator's input, the rest keep their
   token (the reference implementation uses no random-token replacement);
3. the generator's samples replace the chosen tokens in the discriminator's input; a token is labelled
   "replaced" only where the sample differs from the original.

Positions are returned as a fixed-size (batch, max_predictions) block so every shape is static; slots
beyond a sequence's count are marked invalid and carry IGNORE_INDEX targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from electra_kernels import IGNORE_INDEX


@dataclass
class MaskedBatch:
    generator_input_ids: torch.Tensor  # (B, S) input with [MASK] at 85% of the chosen positions
    positions: torch.Tensor  # (B, P) int64 chosen positions; invalid slots point at a non-candidate
    valid: torch.Tensor  # (B, P) bool, slot holds a real chosen position
    targets: torch.Tensor  # (B * P,) int64 original ids, IGNORE_INDEX at invalid slots


class ObjectiveRNG:
    """The random streams of the objective, kept apart from torch's global RNG.

    ``masking`` lives on the device of the batch (masks are drawn there, no host round trip);
    ``seeds`` is a CPU generator that hands out the integer seeds of the in-kernel Gumbel noise.
    Both states go into training checkpoints so a resumed run draws the same masks and samples.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.masking: torch.Generator | None = None
        self.seeds = torch.Generator(device="cpu")
        self.seeds.manual_seed(self.seed ^ 0x5EED)
        self._pending_masking_state: torch.Tensor | None = None

    def masking_generator(self, device: torch.device) -> torch.Generator:
        if self.masking is None or self.masking.device != device:
            self.masking = torch.Generator(device=device)
            self.masking.manual_seed(self.seed)
            if self._pending_masking_state is not None:
                self.masking.set_state(self._pending_masking_state)
                self._pending_masking_state = None
        return self.masking

    def next_sampling_seed(self) -> int:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self.seeds).item())

    def state_dict(self) -> dict:
        state = {"seed": self.seed, "seeds": self.seeds.get_state()}
        if self.masking is not None:
            state["masking"] = self.masking.get_state()
        elif self._pending_masking_state is not None:
            state["masking"] = self._pending_masking_state
        return state

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.seeds.set_state(state["seeds"])
        self.masking = None
        self._pending_masking_state = state.get("masking")


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, mask_prob: float,
                mask_token_ratio: float, max_predictions_per_seq: int, special_ids: tuple[int, ...],
                mask_token_id: int, generator: torch.Generator) -> MaskedBatch:
    """Choose the positions the generator predicts and build its input. See the module docstring."""
    batch, seq_len = input_ids.shape
    real = attention_mask.bool()
    candidates = real.clone()
    for token_id in special_ids:
        candidates &= input_ids != token_id

    num_real = real.sum(dim=1)
    num_to_predict = torch.round(num_real.float() * mask_prob).long()
    num_to_predict = num_to_predict.clamp(min=1, max=max_predictions_per_seq)
    num_to_predict = torch.minimum(num_to_predict, candidates.sum(dim=1))

    # Uniform choice without replacement: the top-k of i.i.d. uniform scores among candidates.
    scores = torch.rand((batch, seq_len), generator=generator, device=input_ids.device)
    scores = scores.masked_fill(~candidates, -1.0)
    k = min(max_predictions_per_seq, seq_len)
    positions = scores.topk(k, dim=1).indices  # sorted by score, so the first num_to_predict are the draw
    if k < max_predictions_per_seq:  # a sequence shorter than the bound: pad the block with slot 0
        positions = torch.nn.functional.pad(positions, (0, max_predictions_per_seq - k))
    slot = torch.arange(max_predictions_per_seq, device=input_ids.device)
    valid = slot[None, :] < num_to_predict[:, None]

    originals = input_ids.gather(1, positions)
    use_mask_token = torch.rand(positions.shape, generator=generator, device=input_ids.device) < mask_token_ratio
    replace = valid & use_mask_token
    generator_input_ids = input_ids.clone()
    generator_input_ids.scatter_(1, positions, torch.where(replace, torch.full_like(originals, mask_token_id), originals))
    targets = torch.where(valid, originals, torch.full_like(originals, IGNORE_INDEX)).reshape(-1)
    return MaskedBatch(generator_input_ids, positions, valid, targets)


def replace_tokens(input_ids: torch.Tensor, masked: MaskedBatch, sampled: torch.Tensor):
    """Place the generator's samples at the chosen positions.

    Returns (discriminator_input_ids (B, S), is_replaced (B, S) bool): a position is "replaced" only
    where the sample differs from the original token.
    """
    originals = input_ids.gather(1, masked.positions)
    sampled = sampled.view_as(masked.positions)
    new_tokens = torch.where(masked.valid, sampled, originals)
    discriminator_input_ids = input_ids.clone()
    discriminator_input_ids.scatter_(1, masked.positions, new_tokens)
    return discriminator_input_ids, discriminator_input_ids != input_ids


@torch.no_grad()
def pretraining_metrics(*, correct: torch.Tensor, valid: torch.Tensor, disc_logits: torch.Tensor,
                        is_replaced: torch.Tensor, real: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached metric tensors (no host sync): generator accuracy at the chosen positions,
    discriminator accuracy over real tokens, precision and recall of the "replaced" class."""
    real = real.bool()
    predicted = (disc_logits > 0) & real
    labels = is_replaced & real
    num_valid = valid.sum().clamp(min=1)
    true_pos = (predicted & labels).sum()
    return {
        "gen_accuracy": (correct & valid.reshape(-1)).sum() / num_valid,
        "disc_accuracy": ((predicted == labels) & real).sum() / real.sum().clamp(min=1),
        "disc_precision": true_pos / predicted.sum().clamp(min=1),
        "disc_recall": true_pos / labels.sum().clamp(min=1),
        "replaced_fraction": labels.sum() / real.sum().clamp(min=1),
        "num_predictions": valid.sum(),
    }
