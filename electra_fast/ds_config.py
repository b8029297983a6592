"""The DeepSpeed config given to ``deepspeed.initialize``: the JSON named by ``train.deepspeed_config``
(configs/deepspeed/) plus the values our YAML decides, derived in one place.

Batch sizes, clipping, precision and the optimizer are filled in from the YAML where the JSON leaves
them out or says "auto"; an explicit JSON value that disagrees with the YAML is a ConfigError naming
both keys. The LR schedule: with no ``scheduler`` (or ``"type": "auto"``) the config names none and
the trainer passes :func:`electra_fast.optim.warmup_decay_schedule` (the one schedule, shared with
fine-tuning); a scheduler the JSON names explicitly is DeepSpeed's and is kept (a WarmupDecayLR gets
its values from the YAML too). Pure Python: this
module imports neither DeepSpeed nor torch, so a bad config fails in milliseconds.
"""

from __future__ import annotations

import copy
import json
import math
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; only the annotations use it
    from importlib.resources.abc import Traversable

from .config import Config, ConfigError


# The DeepSpeed configs shipped inside the package (electra_fast/ds_configs/, read with importlib.resources),
# named in configs by a name that does not depend on the working directory. configs/deepspeed/ in the
# repository holds the same files for reading (tests/test_packaged_configs.py keeps the two equal).
PACKAGED_DIR = "ds_configs"
REPO_COPY_DIR = "configs/deepspeed/"


def packaged_deepspeed_configs() -> dict[str, Traversable]:
    """{"zero0": <file>, "zero1": ..., "zero3-offload": ...}: the configs every install carries."""
    folder = resources.files("electra_fast") / PACKAGED_DIR
    return {entry.name[:-len(".json")]: entry for entry in folder.iterdir() if entry.name.endswith(".json")}


def find_deepspeed_config(name_or_path: str) -> Path | Traversable:
    """``train.deepspeed_config``: a shipped config's name (``zero1``, ``zero3-offload``) or a path to a
    JSON of the user's, relative to the working directory. A relative path into the repository's copy
    (``configs/deepspeed/zero1.json``, what older configs and run dirs hold) that is not there, as in an
    installed package run from elsewhere, is the shipped config of that name."""
    packaged = packaged_deepspeed_configs()
    if name_or_path in packaged:
        return packaged[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = name_or_path[len(REPO_COPY_DIR):-len(".json")] if name_or_path.startswith(REPO_COPY_DIR) else None
    if name in packaged:
        return packaged[name]
    raise ConfigError(f"train.deepspeed_config: no such file: {path.resolve()}, and not the name of a shipped "
                      f"config ({', '.join(sorted(packaged))})")


def shipped_name(name_or_path: str) -> str | None:
    """The shipped config that ``train.deepspeed_config`` refers to, or None (a user's own JSON, or no file).

    ``zero1`` and ``configs/deepspeed/zero1.json`` (what older configs and run dirs hold) are the same
    config, and so is any file named ``<name>.json`` whose bytes are the shipped ``<name>``'s: a resume
    must not report a change between them. A file with the shipped name but other contents is the
    user's own (None)."""
    packaged = packaged_deepspeed_configs()
    if name_or_path in packaged:
        return name_or_path
    try:
        found = find_deepspeed_config(name_or_path)
    except ConfigError:
        return None
    name = found.name[:-len(".json")] if found.name.endswith(".json") else None
    if name not in packaged:
        return None
    try:
        same = found.read_bytes() == packaged[name].read_bytes()
    except OSError:
        return None
    return name if same else None


def same_deepspeed_config(a: str, b: str) -> bool:
    """Whether two ``train.deepspeed_config`` values name the same config (equal, or the same shipped one)."""
    if a == b:
        return True
    name = shipped_name(a)
    return name is not None and name == shipped_name(b)


def read_deepspeed_json(name_or_path: str) -> tuple[dict, Path | Traversable]:
    found = find_deepspeed_config(name_or_path)
    try:
        values = json.loads(found.read_text())
    except ValueError as exc:
        raise ConfigError(f"{found}: not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{found}: the top level must be an object")
    return values, found


def resolve_precision(precision: str, device_type: str, bf16_supported: bool = True,
                      fp16_supported: bool = True) -> str:
    """"auto" -> bf16 on a GPU that has it (fp16 on older GPUs), fp32 on the CPU."""
    if precision == "auto":
        if device_type == "cpu":
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if precision == "bf16" and not bf16_supported:
        raise ConfigError(f"train.precision=bf16 but this {device_type} device has no bf16 support; use fp16 or fp32")
    if precision == "fp16" and not fp16_supported:
        raise ConfigError(f"train.precision=fp16 is not supported on this {device_type} device; use bf16 or fp32")
    return precision


def lookup(tree: dict, dotted: str) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"``, or None where a part is missing."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None or child == "auto":
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{'.'.join(parts[:i + 1])}' must be an object, got {child!r}")
        node = child
    node[parts[-1]] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b if isinstance(a, bool) and isinstance(b, bool) else False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    return a == b


def _find_auto(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if tree == "auto" else []


def build_deepspeed_config(cfg: Config, user: dict, *, world_size: int, device_type: str,
                           source: str = "the DeepSpeed config", bf16_supported: bool = True,
                           fp16_supported: bool = True) -> dict:
    """The config given to ``deepspeed.initialize``: ``user`` (the JSON) plus what our YAML decides.

    Every value both need is derived here from ``cfg`` and written where the JSON leaves it out or says
    "auto". An explicit JSON value equal to the derived one is fine; a different one is a ConfigError
    naming both keys, so the two files can never silently disagree. Global batch = micro batch x
    accumulation x world size (an explicit JSON micro batch or accumulation is used when the YAML
    derives it). Values with no YAML counterpart (ZeRO settings, loss-scale window, ...) pass through.
    """
    tc = cfg.train
    out = copy.deepcopy(user)

    # Batch layout: the YAML decides; an explicit JSON micro batch / accumulation fills a YAML zero.
    layout_cfg = copy.copy(tc)
    for json_key, yaml_key in (("train_micro_batch_size_per_gpu", "micro_batch_size"),
                               ("gradient_accumulation_steps", "gradient_accumulation_steps")):
        value = out.get(json_key)
        if value not in (None, "auto") and getattr(tc, yaml_key) == 0:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{source}: '{json_key}' must be a positive integer or \"auto\", got {value!r}")
            setattr(layout_cfg, yaml_key, value)
    micro, accumulation = layout_cfg.batch_layout(world_size)

    precision = resolve_precision(tc.precision, device_type, bf16_supported, fp16_supported)
    offload = lookup(out, "zero_optimization.offload_optimizer.device") not in (None, "none")
    optimizer = {"adamw": "AdamW", "lamb": "Lamb"}[tc.optimizer]
    if optimizer == "Lamb" and device_type != "cuda":
        raise ConfigError("train.optimizer=lamb uses DeepSpeed's FusedLamb, a CUDA kernel; use adamw on "
                          f"{device_type}")

    # (key in the DeepSpeed config, value, the YAML key it comes from)
    derived: list[tuple[str, Any, str]] = [
        ("train_batch_size", tc.global_batch_size, "train.global_batch_size"),
        ("train_micro_batch_size_per_gpu", micro, f"train.micro_batch_size (derived: {micro})"),
        ("gradient_accumulation_steps", accumulation, f"train.gradient_accumulation_steps (derived: {accumulation})"),
        ("gradient_clipping", tc.grad_clip, "train.grad_clip"),
        ("bf16.enabled", precision == "bf16", f"train.precision ({precision})"),
        ("fp16.enabled", precision == "fp16", f"train.precision ({precision})"),
        ("optimizer.type", optimizer, "train.optimizer"),
        ("optimizer.params.lr", tc.lr, "train.lr"),
        ("optimizer.params.betas", [tc.adam_beta1, tc.adam_beta2], "train.adam_beta1/adam_beta2"),
        ("optimizer.params.eps", tc.adam_eps, "train.adam_eps"),
        ("optimizer.params.weight_decay", tc.weight_decay, "train.weight_decay"),
    ]
    scheduler = out.get("scheduler")
    scheduler_type = lookup(out, "scheduler.type")
    if scheduler in (None, "auto") or scheduler_type in (None, "auto"):
        # The one schedule (electra_fast.optim.lr_multiplier, shared with fine-tuning): the trainer hands
        # it to deepspeed.initialize, so the DeepSpeed config names no scheduler of its own.
        if isinstance(scheduler, dict) and scheduler.get("params"):
            raise ConfigError(f"{source}: 'scheduler.params' is given but 'scheduler.type' is not; name the type "
                              "(e.g. \"WarmupDecayLR\") or drop the scheduler section to use the built-in schedule")
        out.pop("scheduler", None)
    elif str(scheduler_type).lower() == "warmupdecaylr":
        # An explicit DeepSpeed WarmupDecayLR: its values come from the YAML as well.
        derived += [
            ("scheduler.params.warmup_min_lr", 0.0, "warm-up from 0"),
            ("scheduler.params.warmup_max_lr", tc.lr, "train.lr"),
            ("scheduler.params.warmup_num_steps", tc.warmup_steps, "train.warmup_steps"),
            ("scheduler.params.total_num_steps", tc.max_steps, "train.max_steps"),
            ("scheduler.params.warmup_type", "linear", "linear warm-up"),
        ]
    for key, value, origin in derived:
        current = lookup(out, key)
        if current is None or current == "auto":
            _set(out, key, value, source)
        elif not _same(current, value):
            raise ConfigError(f"{source}: '{key}' is {current!r} but the YAML gives {value!r} (from {origin}); "
                              f"set '{key}' to \"auto\" in the JSON or change the YAML")

    # Values with no YAML counterpart, filled only where the JSON leaves them to us.
    params = out["optimizer"].setdefault("params", {})
    if optimizer == "AdamW":
        # torch's AdamW (fused kernel on CUDA) needs no JIT-built DeepSpeed op; under ZeRO-Offload the
        # optimizer runs on the CPU, where DeepSpeed's vectorised CPU Adam is the fast one.
        if params.get("torch_adam", "auto") == "auto":
            params["torch_adam"] = not offload
        if params["torch_adam"] and device_type == "cuda" and params.get("fused", "auto") == "auto":
            params["fused"] = True
        if params.get("fused") == "auto":
            params.pop("fused")
    else:
        for key in ("torch_adam", "fused"):
            if params.get(key, "auto") != "auto":
                raise ConfigError(f"{source}: 'optimizer.params.{key}' applies to AdamW, not train.optimizer=lamb")
            params.pop(key, None)

    left = _find_auto(out)
    if left:
        raise ConfigError(f"{source}: no value for \"auto\" at {', '.join(left)} (only keys the YAML decides can "
                          "be \"auto\")")
    return out


