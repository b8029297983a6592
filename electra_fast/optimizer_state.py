"""Adam's state per parameter, across ZeRO stages and world sizes (elastic resume).

A checkpoint written by N ranks with ZeRO stage S holds the optimizer's state in S's layout: per
parameter (ZeRO-0), or as flat fp32 partitions, one per rank and parameter group (ZeRO-1/2), or per
rank and sub-group with every parameter split evenly (ZeRO-3). Resuming on M ranks with stage S'
needs that state in the other layout, exactly. This module does it in two steps, each through
DeepSpeed's own code:

* :func:`read_optimizer_state` turns the checkpoint's partitions into one full fp32 tensor per
  parameter and state key (``exp_avg``, ``exp_avg_sq``) plus the step count. Adam's state tensors have
  the layout of the fp32 master partition they belong to (``zeros_like`` of it), so DeepSpeed's
  ``zero_to_fp32`` merge, the one that consolidates the weights for export, merges them too: it is
  handed each state key's partitions in place of the masters'. Every file is read weights-only.
* :func:`load_optimizer_state` writes them into a freshly built engine of any stage through DeepSpeed's
  per-parameter optimizer-state API (``safe_set_full_optimizer_state``, and for ZeRO-3 the local form
  ``safe_set_local_optimizer_state``, whose full form cannot address a padded last partition in
  DeepSpeed 0.19). ZeRO-0 without mixed precision has no DeepSpeed wrapper: its torch optimizer's
  per-parameter state is set directly; with fp16/bf16, DeepSpeed's FP16 wrappers (fp32 masters per
  parameter, or per group as one flat tensor) have no per-parameter API, and their slices are written.
  Each rank holds the whole merged state in host memory while it loads (as for the weights).

The learning rate of the next update is the optimizer's, not the schedule's: the saved parameter
groups' hyper-parameters are restored with the state (electra_fast.checkpoints then recomputes the
rate from the restored schedule, the same float when nothing changed).

Why not universal checkpoints (``ds_to_universal`` + ``checkpoint.load_universal``)? They cover ZeRO
1-3 only: a ZeRO-0 fp32 checkpoint (the CPU default) has no partition files to convert, and the engine
cannot load one into ZeRO-0's plain torch optimizer, so a second path would be needed anyway. The
conversion also writes a second full copy of the checkpoint (fp32, both moments and the step per
parameter, through a temporary folder of fragments) with a process pool, and that copy's files would
need their own manifest before they may be unpickled. Reading the verified files in memory and
setting the state per parameter needs neither, and works the same for every stage on both sides.

:func:`gather_optimizer_state` is the inverse of the load on a live engine (a collective under ZeRO):
what tests compare before a save and after an elastic resume.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config
from .safe_load import CheckpointError, deepspeed_loads_safely, safe_torch_load


class UnsupportedOptimizerLayout(CheckpointError):
    """The checkpoint's optimizer state is in a layout this module does not convert (e.g. fp16's
    wrapper under ZeRO-0); the caller restores the weights alone and says so."""


@dataclass
class OptimizerState:
    """Full (unpartitioned) fp32 optimizer state: ``tensors[key][name]`` in the parameter's shape, and
    the number of updates Adam has applied to each parameter, ``steps[name]``."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    # The optimizer's parameter groups as saved, without their parameters: the learning rate of the
    # next update (the schedule set it at the last one) and the other hyper-parameters.
    param_groups: list[dict] = field(default_factory=list)

    def names(self) -> set[str]:
        return set(self.steps)


# ==================================================================================================
# Reading a checkpoint folder
# ==================================================================================================
def read_optimizer_state(tag_dir: Path, config: Config | None) -> OptimizerState:
    """The optimizer state of a verified checkpoint folder, whatever its ZeRO stage and world size.
    ``config``: the run's config as the checkpoint records it (ZeRO-0 names its parameters by it);
    electra_fast.checkpoints.checkpoint_optimizer_state reads it from the folder."""
    tag_dir = Path(tag_dir)
    if list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        return _read_zero_partitions(tag_dir)
    if config is None:
        raise UnsupportedOptimizerLayout(f"{tag_dir}: no config saved with it, so its ZeRO-0 optimizer's parameters "
                                         "have no names")
    return _read_zero0(tag_dir, config)


# How the optimizer runs here (a fused kernel on a GPU, foreach on the CPU), not state to carry over.
IMPLEMENTATION_KEYS = frozenset({"params", "fused", "foreach", "capturable", "differentiable"})


def _hyperparameters(param_groups: list[dict]) -> list[dict]:
    return [{k: v for k, v in group.items() if k not in IMPLEMENTATION_KEYS} for group in param_groups]


def _step_count(value) -> int:
    return int(float(value.item() if isinstance(value, torch.Tensor) else value))


def _tensor_keys(state: dict, numel: int) -> list[str]:
    """The per-element state keys (Adam: exp_avg, exp_avg_sq) of one state entry."""
    return sorted(k for k, v in state.items() if isinstance(v, torch.Tensor) and k != "step" and v.numel() >= numel
                  and v.dim() > 0)


def _read_zero_partitions(tag_dir: Path) -> OptimizerState:
    """ZeRO-1/2/3: each rank's file holds its partition of every state key; merged by zero_to_fp32."""
    from deepspeed.utils import zero_to_fp32

    optim_files = zero_to_fp32.get_optim_files(str(tag_dir))  # sorted by rank
    model_files = zero_to_fp32.get_model_state_files(str(tag_dir))
    ranks = [safe_torch_load(path, mmap=True)["optimizer_state_dict"] for path in optim_files]
    with deepspeed_loads_safely(), contextlib.redirect_stdout(sys.stderr):
        model_states = zero_to_fp32.parse_model_states(model_files)
    stage = int(ranks[0]["zero_stage"])
    world = ranks[0]["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(ranks):
        raise CheckpointError(f"{tag_dir}: {len(ranks)} optimizer partition files for a world size of {world}")
    param_shapes = model_states[0].param_shapes  # one ordered {name: shape} per (sub-)group
    if stage <= 2:
        bases, masters = [r["base_optimizer_state"] for r in ranks], [r["single_partition_of_fp32_groups"] for r in ranks]
        if not all(isinstance(b, dict) and "state" in b for b in bases):
            raise UnsupportedOptimizerLayout(f"{tag_dir}: ZeRO's elastic_checkpoint layout is not converted")
    else:
        bases, masters = [r["optimizer_state_dict"] for r in ranks], [r["fp32_flat_groups"] for r in ranks]
    groups = len(masters[0])
    first = bases[0]["state"]
    state = OptimizerState(param_groups=_hyperparameters(bases[0]["param_groups"]))
    if not first.get(0):  # saved before any update was applied: Adam's state is still empty
        return state
    keys = _tensor_keys(first[0], masters[0][0].numel())
    if not keys or any(set(_tensor_keys(first[g], masters[0][g].numel())) != set(keys) for g in range(groups)):
        raise UnsupportedOptimizerLayout(f"{tag_dir}: its optimizer state has no per-element tensors in every group")
    for key in keys:
        # ZeRO-1/2 keep the group's alignment padding in the optimizer's tensors but not in the saved
        # masters: the state is cut to the master's length, the layout zero_to_fp32 expects.
        flat = [[base["state"][g][key][:master[g].numel()] for g in range(groups)]
                for base, master in zip(bases, masters)]
        with contextlib.redirect_stdout(sys.stderr):  # zero_to_fp32 prints progress
            if stage <= 2:
                merged = zero_to_fp32._get_fp32_state_dict_from_zero2_checkpoint(
                    world, flat, model_states, False, ranks[0].get("param_alignment_paddings"))
            else:
                merged = zero_to_fp32.to_torch_tensor(
                    zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint(world, flat, model_states, False))
        state.tensors[key] = {name: merged[name].float().clone() for shapes in param_shapes for name in shapes}
    for group, shapes in enumerate(param_shapes):
        steps = {_step_count(base["state"][group]["step"]) for base in bases if "step" in base["state"][group]}
        if len(steps) != 1:
            raise CheckpointError(f"{tag_dir}: the ranks' step counts of parameter group {group} differ ({steps})")
        step = steps.pop()
        state.steps.update({name: step for name in shapes})
    return state


def zero0_parameter_names(config: Config) -> list[list[str]]:
    """The names of a ZeRO-0 checkpoint's optimizer parameter groups, in order. DeepSpeed records no
    names there; the groups are optim.weight_decay_groups() of the model the config describes."""
    from .model import ElectraPretrainingModel
    from .optim import weight_decay_groups

    with torch.device("meta"):  # names and group order only; no memory, no initialisation
        model = ElectraPretrainingModel(config)
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in weight_decay_groups(model.named_parameters(), 0.0)
            if group["params"]]


def _read_zero0(tag_dir: Path, config: Config) -> OptimizerState:
    """ZeRO-0: rank 0's model-states file holds the torch optimizer's state dict, per parameter."""
    states = safe_torch_load(Path(tag_dir) / "mp_rank_00_model_states.pt", mmap=True)
    optimizer = states.get("optimizer")
    # fp16/bf16 without ZeRO: DeepSpeed's wrapper keeps the torch optimizer's state dict inside its own,
    # per fp32 master (FP16_UnfusedOptimizer) or per flat fp32 group (FP16_Optimizer, "fp32_groups_flat").
    flat = isinstance(optimizer, dict) and "fp32_groups_flat" in optimizer
    if isinstance(optimizer, dict) and isinstance(optimizer.get("optimizer_state_dict"), dict):
        optimizer = optimizer["optimizer_state_dict"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict) and "param_groups" in optimizer):
        raise UnsupportedOptimizerLayout(f"{tag_dir}: its ZeRO-0 optimizer state is in no layout this module knows")
    groups = zero0_parameter_names(config)
    indices = [group["params"] for group in optimizer["param_groups"]]
    if [1 if flat else len(g) for g in groups] != [len(i) for i in indices]:
        raise CheckpointError(f"{tag_dir}: the optimizer's parameter groups do not match the model's")
    state = OptimizerState(param_groups=_hyperparameters(optimizer["param_groups"]))
    shapes = states["module"]
    for names, group in zip(groups, indices):
        # (name, index of the state entry, offset in it): one entry per parameter, or one flat per group
        offsets = [sum(shapes[n].numel() for n in names[:i]) for i in range(len(names))] if flat else [0] * len(names)
        for name, index, offset in zip(names, group * len(names) if flat else group, offsets):
            entry = optimizer["state"].get(index)
            if not entry:  # never updated (no gradient yet): Adam's state is still empty
                continue
            numel, shape = shapes[name].numel(), shapes[name].shape
            for key in _tensor_keys(entry, numel):
                value = entry[key].reshape(-1)[offset:offset + numel]
                state.tensors.setdefault(key, {})[name] = value.float().reshape(shape).clone()
            state.steps[name] = _step_count(entry["step"])
    return state


# ==================================================================================================
# A live engine: load into it, gather from it
# ==================================================================================================
def _base_optimizer(engine):
    """(DeepSpeed's wrapper or None, the torch optimizer that holds the state)."""
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", None)
    return (optimizer, inner) if inner is not None else (None, optimizer)


def _flat_groups(wrapper) -> list[tuple[torch.Tensor, list[torch.nn.Parameter]]]:
    """(the fp32 tensor the torch optimizer updates, the module parameters it holds a part of), for
    every such tensor of a ZeRO/bf16/fp16 wrapper."""
    segments = _segments(wrapper)
    if segments is not None:
        holders: dict[int, tuple[torch.Tensor, list]] = {}
        for params in wrapper.fp16_groups:
            for param in params:
                holder = segments[id(param)][0]
                holders.setdefault(id(holder), (holder, []))[1].append(param)
        return list(holders.values())
    for flats, params in (("single_partition_of_fp32_groups", "bit16_groups"),  # ZeRO-1/2
                          ("fp32_partitioned_groups_flat", "fp16_groups"),  # ZeRO-3
                          ("fp32_groups_flat_partition", "bf16_groups")):  # bf16 with ZeRO-0
        if getattr(wrapper, flats, None) is not None and getattr(wrapper, params, None) is not None:
            return list(zip(getattr(wrapper, flats), getattr(wrapper, params)))
    raise UnsupportedOptimizerLayout(f"{type(wrapper).__name__}: an optimizer wrapper this module does not know")


def _step_value(step: int, optimizer, group: dict, like: torch.Tensor):
    """Adam's step in the optimizer's own form: torch's keeps a float32 tensor (on the device when fused
    or capturable), DeepSpeed's CPU Adam a Python int."""
    if not type(optimizer).__module__.startswith("torch.optim"):
        return int(step)
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(float(step), dtype=torch.float32, device=like.device if on_device else "cpu")


def _segments(wrapper) -> dict[int, tuple[torch.Tensor, int]] | None:
    """fp16/bf16 without ZeRO (DeepSpeed's FP16 wrappers): id(module parameter) -> (the fp32 tensor the
    torch optimizer updates, the parameter's offset in it): its own master (FP16_UnfusedOptimizer) or
    its group's flat master (FP16_Optimizer). None for other wrappers."""
    if getattr(wrapper, "fp16_groups", None) is None or hasattr(wrapper, "fp32_partitioned_groups_flat"):
        return None
    if getattr(wrapper, "fp32_groups_flat", None) is not None:
        found = {}
        for flat, params in zip(wrapper.fp32_groups_flat, wrapper.fp16_groups):
            offset = 0
            for param in params:
                found[id(param)] = (flat, offset)
                offset += param.numel()
        return found
    if getattr(wrapper, "fp32_groups", None) is not None:
        return {id(p): (master, 0) for params, masters in zip(wrapper.fp16_groups, wrapper.fp32_groups)
                for p, master in zip(params, masters)}
    return None


def _zero3_local(param, value: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a full tensor: an even split, the last piece padded with zeros."""
    part = param.ds_tensor.numel()
    piece = value.reshape(-1)[rank * part:(rank + 1) * part]
    if piece.numel() < part:
        piece = torch.cat([piece, piece.new_zeros(part - piece.numel())])
    return piece


def set_full_fp32(engine, param, value: torch.Tensor, key: str | None = None) -> bool:
    """Write a full fp32 tensor into ``param``'s master weights (``key`` None) or optimizer state
    ``key`` through DeepSpeed's per-parameter API. False when the parameter has no DeepSpeed master."""
    from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state, safe_set_local_fp32_param,
                                 safe_set_local_optimizer_state)

    if hasattr(param, "ds_id"):  # ZeRO-3: the local form (its full form mis-addresses a padded last piece)
        rank = torch.distributed.get_rank(group=engine.optimizer.dp_process_group)
        piece = _zero3_local(param, value, rank).to(param.ds_tensor.device)
        if key is None:
            safe_set_local_fp32_param(param, piece)
        else:
            safe_set_local_optimizer_state(param, piece, key)
        return True
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 and the bf16 wrapper: each rank copies its own fragment
        value = value.to(param.device)
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return True
    wrapper, optimizer = _base_optimizer(engine)
    segment = (_segments(wrapper) or {}).get(id(param)) if wrapper is not None else None
    if segment is None:
        return False
    holder, offset = segment  # DeepSpeed has no per-parameter API for these wrappers: the slice itself
    target = holder.data if key is None else optimizer.state[holder][key]
    target.view(-1)[offset:offset + param.numel()].copy_(value.reshape(-1).to(target.device, target.dtype))
    return True


def _link_fragments(wrapper) -> None:
    """ZeRO-1/2/bf16 point each parameter at its fragment of the optimizer's state only after their
    first update (and not after DeepSpeed's own load); the per-parameter API reads and writes through
    those fragments, so they are linked to the state as it is now."""
    if hasattr(wrapper, "_hp_optimizer_states_linked"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


def load_optimizer_state(engine, state: OptimizerState) -> None:
    """Give a freshly built engine (no update yet) the optimizer state ``state``, exactly.

    The torch optimizer's state is created the way its first update would (a zero tensor per key in
    the layout of the tensor it updates, and the step), with the saved step; then the values are
    written per parameter. Every rank calls this with the same ``state``."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    wrapper, optimizer = _base_optimizer(engine)
    if state.param_groups:
        if len(state.param_groups) != len(optimizer.param_groups):
            raise CheckpointError(f"the checkpoint's optimizer has {len(state.param_groups)} parameter groups, this "
                                  f"one {len(optimizer.param_groups)}")
        for group, saved in zip(optimizer.param_groups, state.param_groups):
            group.update(saved)
    missing = sorted(set(names.values()) - state.names())
    if not state.steps:  # saved before any update: the fresh optimizer's empty state is the saved one
        return
    if missing and wrapper is not None:  # ZeRO's partitions hold every parameter's state, or none
        raise CheckpointError(f"the checkpoint's optimizer state has no entry for {len(missing)} parameter(s) of "
                              f"the model (e.g. {missing[0]})")
    keys = sorted(state.tensors)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    if wrapper is None:  # ZeRO-0 fp32: torch's optimizer holds the module's own parameters
        for param in engine.module.parameters():
            name = names[id(param)]
            if name not in state.steps:  # never updated when saved: its state stays empty here too
                continue
            entry = {"step": _step_value(state.steps[name], optimizer, group_of[id(param)], param)}
            entry.update({key: state.tensors[key][name].to(param.device, param.dtype).reshape(param.shape).clone()
                          for key in keys})
            optimizer.state[param] = entry
        return
    for flat, params in _flat_groups(wrapper):
        steps = {state.steps[names[id(p)]] for p in params}
        if len(steps) != 1:
            raise CheckpointError(f"parameters updated a different number of times ({sorted(steps)}) would share one "
                                  "ZeRO partition's step count: resume on the ZeRO stage the checkpoint was written "
                                  "with")
        entry = {"step": _step_value(steps.pop(), optimizer, group_of.get(id(flat), optimizer.param_groups[0]), flat)}
        entry.update({key: torch.zeros_like(flat) for key in keys})
        optimizer.state[flat] = entry
    _link_fragments(wrapper)
    for param in engine.module.parameters():
        for key in keys:
            set_full_fp32(engine, param, state.tensors[key][names[id(param)]].float(), key)


def gather_optimizer_state(engine) -> OptimizerState:
    """The engine's optimizer state per parameter, full and in fp32 (a collective under ZeRO: every rank
    calls it and gets the whole state). Parameters with no state yet are left out."""
    from deepspeed.utils import safe_get_full_optimizer_state

    wrapper, optimizer = _base_optimizer(engine)
    state = OptimizerState()
    flat_of: dict[int, torch.Tensor] = {}
    if wrapper is not None:
        if optimizer.state:
            _link_fragments(wrapper)
        for flat, params in _flat_groups(wrapper):
            flat_of.update({id(p): flat for p in params})
    for name, param in engine.module.named_parameters():
        if wrapper is None:
            entry = optimizer.state.get(param)
            if not entry:
                continue
            for key in _tensor_keys(entry, param.numel()):
                state.tensors.setdefault(key, {})[name] = entry[key].detach().float().cpu().clone()
            state.steps[name] = _step_count(entry["step"])
            continue
        entry = optimizer.state.get(flat_of[id(param)])
        if not entry:
            continue
        segment = (_segments(wrapper) or {}).get(id(param))
        for key in _tensor_keys(entry, 1):
            if segment is not None:
                value = entry[key].reshape(-1)[segment[1]:segment[1] + param.numel()]
            else:
                value = safe_get_full_optimizer_state(param, key)
            shape = getattr(param, "ds_shape", param.shape)
            state.tensors.setdefault(key, {})[name] = value.detach().float().cpu().reshape(shape).clone()
        state.steps[name] = _step_count(entry["step"])
    return state
