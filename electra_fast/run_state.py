"""What a run is, and what may change when it resumes: the data it trains on and its resolved config.

A run directory records, from its first start on::

    config.yaml          the resolved config the run trains with (rewritten only by an accepted change)
    run_identity.json    the data it was trained on (vocabulary hash, special ids, vocab size, seq_len,
                         number of examples, the dataset's fingerprint), the YAML it was started from
                         and its --set overrides, and every config change accepted since (step, time,
                         key: old -> new, and how it was accepted)

The rules of ``--resume`` (when the run has a checkpoint to continue from):

* The run's own resolved config is the starting point: ``--resume`` without ``--config`` trains with
  ``config.yaml`` as it is (plus any ``--set``).
* Only what the user changes counts. ``--set KEY=VALUE`` changes KEY. With ``--config FILE``, the keys
  whose value in FILE differs from the YAML the run was started from are changes (every key FILE
  names, for a run that recorded no YAML). A key the user does not name keeps the run's value, so the
  start command's ``--set data.path=...`` need not be repeated. Removing a key from the YAML changes
  nothing; set the value with ``--set``.
* A change to a key in :data:`OPERATIONAL_KEYS` (where the data lives, how often to log and save, the
  loader's processes) changes nothing the run computes: it is accepted and recorded. Any other
  changed key refuses the resume, with one message listing every difference (``key: old -> new``),
  unless the key is named by ``--allow-config-change``; accepted changes are recorded with the step
  and time, and ``config.yaml`` is rewritten to match.
* The data must be the same: a different vocabulary, special ids, vocab size, seq_len, number of
  examples or dataset fingerprint refuses the resume, listed in the same message. No flag accepts it:
  a model cannot continue on a vocabulary whose ids mean other word pieces.
* The vocabulary size and special ids in the config come from the data (``apply_data_manifest``), so
  they are compared as part of the data, not as config keys.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .atomic import write_text_atomic
from .checkpoints import TAG_PATTERN, checkpoint_root, read_latest
from .config import SIZES, Config, ConfigError, apply_overrides, apply_section, load_config, read_yaml
from .ds_config import same_deepspeed_config
from .hashing import sha256_file

RUN_RECORD = "run_identity.json"
CONFIG_RECORD = "config.yaml"
RECORD_FORMAT = 1

# Keys whose change alters nothing the run computes: accepted on resume without a flag (and recorded).
OPERATIONAL_KEYS = frozenset({
    "data.path",  # the data itself is compared by its identity, wherever it lives now
    "data.num_workers", "data.prefetch_factor", "data.pin_memory",
    "train.log_every", "train.save_every", "train.save_every_minutes", "train.keep_last", "train.checkpoint_dir",
    "train.dist_timeout_minutes",
    "train.export_at_end", "train.peak_tflops", "train.max_nonfinite_steps",
})
# Config keys filled in from the data's manifest: compared through the data's identity instead.
DATA_DERIVED_KEYS = frozenset({"model.vocab_size", "model.pad_token_id", "model.unk_token_id",
                               "model.cls_token_id", "model.sep_token_id", "model.mask_token_id"})
# Files whose bytes define what the token ids mean, the first one present is hashed.
VOCAB_FILES = ("vocab.txt", "tokenizer.json")


class ResumeRefused(ConfigError):
    """``--resume`` asked for a config or data the run was not trained with; the message lists each difference."""


# --------------------------------------------------------------------------------------------------
# The data's identity
# --------------------------------------------------------------------------------------------------
def data_identity(data_dir: str | Path, manifest: dict) -> dict[str, Any]:
    """What makes two prepared datasets the same to a model: the vocabulary file's bytes, the special
    ids, sizes, and the manifest's fingerprint (its inputs and settings) when it has one."""
    folder = Path(data_dir).expanduser()
    vocab_file = next((name for name in VOCAB_FILES if (folder / name).is_file()), None)
    return {
        "vocab_file": vocab_file,
        "vocab_sha256": sha256_file(folder / vocab_file) if vocab_file else None,
        "vocab_size": int(manifest["vocab_size"]),
        "special_token_ids": {name: int(value) for name, value in manifest["special_token_ids"].items()},
        "seq_len": int(manifest["seq_len"]),
        "num_examples": int(manifest["num_examples"]),
        "fingerprint": manifest.get("fingerprint"),
    }


def _identity_from_config(stored: Config) -> dict[str, Any]:
    """What a run recorded before run_identity.json existed still says about its data: sizes and ids."""
    m = stored.model
    return {"vocab_size": m.vocab_size, "seq_len": stored.data.seq_len,
            "special_token_ids": {name: getattr(m, f"{name}_token_id")
                                  for name in ("pad", "unk", "cls", "sep", "mask")}}


def data_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per way ``current`` is not the data ``recorded`` describes (a value either side lacks is
    not compared: older manifests have no fingerprint)."""
    lines = []
    if recorded.get("vocab_sha256") and current.get("vocab_sha256") != recorded["vocab_sha256"]:
        lines.append(f"data vocabulary ({recorded.get('vocab_file')} sha256): {recorded['vocab_sha256'][:12]} -> "
                     f"{(current.get('vocab_sha256') or 'no vocabulary file')[:12]}")
    for key, label in (("vocab_size", "vocab_size"), ("seq_len", "seq_len"), ("num_examples", "examples")):
        if recorded.get(key) is not None and current.get(key) != recorded[key]:
            lines.append(f"data {label}: {recorded[key]} -> {current.get(key)}")
    old_ids, new_ids = recorded.get("special_token_ids") or {}, current.get("special_token_ids") or {}
    for name in old_ids:
        if new_ids.get(name) != old_ids[name]:
            lines.append(f"data special token id {name}: {old_ids[name]} -> {new_ids.get(name)}")
    if recorded.get("fingerprint") and current.get("fingerprint") and current["fingerprint"] != recorded["fingerprint"]:
        lines.append(f"data fingerprint: {recorded['fingerprint'][:12]} -> {current['fingerprint'][:12]}")
    return lines


# --------------------------------------------------------------------------------------------------
# Config keys and their differences
# --------------------------------------------------------------------------------------------------
def flatten(cfg: Config) -> dict[str, Any]:
    """{"size": ..., "section.key": value, ...} of a resolved config."""
    values = cfg.to_dict()
    flat = {"size": values.pop("size")}
    for section, keys in values.items():
        flat.update({f"{section}.{key}": value for key, value in keys.items()})
    return flat


def check_known_keys(keys: list[str] | tuple[str, ...], option: str = "--allow-config-change") -> None:
    known = set(flatten(Config()))
    unknown = [key for key in keys if key not in known]
    if unknown:
        raise ConfigError(f"{option}: unknown config key(s) {', '.join(unknown)} (keys look like train.max_steps)")


def config_differences(stored: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """key -> (old, new) for every key whose value differs (data-derived keys left to the data check)."""
    old, now = flatten(stored), flatten(new)
    changes = {key: (old[key], now[key]) for key in old if key not in DATA_DERIVED_KEYS and old[key] != now[key]}
    # "configs/deepspeed/zero1.json" (older configs, run dirs) and "zero1" are one shipped config.
    ds_key = "train.deepspeed_config"
    if ds_key in changes and same_deepspeed_config(*changes[ds_key]):
        del changes[ds_key]
    return changes


def _yaml_changes(old_yaml: dict | None, new_yaml: dict) -> dict[str, dict[str, Any]]:
    """The sections/keys of ``new_yaml`` the user changed relative to ``old_yaml`` (all, if None)."""
    changed: dict[str, dict[str, Any]] = {}
    for name, section in new_yaml.items():
        if name == "size":
            if old_yaml is None or old_yaml.get("size") != section:
                changed["size"] = section
            continue
        section = {} if section is None else section
        if not isinstance(section, dict):
            raise ConfigError(f"config section '{name}' must be a mapping, got {type(section).__name__}")
        before = (old_yaml or {}).get(name) or {}
        for key, value in section.items():
            if old_yaml is None or key not in before or before[key] != value:
                changed.setdefault(name, {})[key] = value
    return changed


# --------------------------------------------------------------------------------------------------
# The run's record
# --------------------------------------------------------------------------------------------------
@dataclass
class RunRecord:
    """The run directory's config.yaml and run_identity.json, as read (both may be absent)."""

    run_dir: Path
    config: Config | None = None
    data: dict[str, Any] | None = None
    launch: dict[str, Any] | None = None
    config_changes: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, run_dir: str | Path) -> "RunRecord":
        run_dir = Path(run_dir)
        record = cls(run_dir)
        if (run_dir / CONFIG_RECORD).is_file():
            record.config = load_config(run_dir / CONFIG_RECORD)
        path = run_dir / RUN_RECORD
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{path}: cannot read the run's identity record: {exc}") from None
            if not isinstance(saved, dict) or saved.get("format") != RECORD_FORMAT:
                raise ConfigError(f"{path}: not a run record of this version of electra-fast")
            record.data, record.launch = saved.get("data"), saved.get("launch")
            record.config_changes = list(saved.get("config_changes") or [])
        return record

    # ---------------------------------------------------------------------------- resolving a resume
    def resolve(self, config_path: str | None, overrides: list[str], size: str | None) -> tuple[Config, dict]:
        """The config to resume with: the run's own, with what the user changed laid on top (see the
        module docstring). Returns it and the launch record (the YAML it corresponds to)."""
        if self.config is None:
            raise ConfigError(f"{self.run_dir / CONFIG_RECORD} is missing: a run is resumed with its own config "
                              "(every checkpoint folder holds a copy, electra_fast_config.json)")
        cfg = copy.deepcopy(self.config)
        launch = copy.deepcopy(self.launch) or {"config_file": None, "config_yaml": None, "overrides": []}
        if config_path is not None:
            new_yaml = read_yaml(config_path)
            changed = _yaml_changes(launch.get("config_yaml"), new_yaml)
            if "size" in changed:
                _set_size(cfg, changed.pop("size"))
            for name, values in changed.items():
                if name not in cfg.to_dict():
                    raise ConfigError(f"unknown config section '{name}' in {config_path}")
                apply_section(getattr(cfg, name), name, values, saved=True)
            launch.update(config_file=str(config_path), config_yaml=new_yaml)
        if size is not None:
            _set_size(cfg, size)
        apply_overrides(cfg, overrides)
        launch["overrides"] = list(launch.get("overrides") or []) + [o for o in overrides
                                                                       if o not in (launch.get("overrides") or [])]
        return cfg.validate(), launch

    def check_resume(self, cfg: Config, data: dict[str, Any], allowed: list[str] | tuple[str, ...]
                     ) -> dict[str, tuple[Any, Any]]:
        """Refuse (ResumeRefused, every difference listed) or return the accepted changes: key -> (old, new)."""
        if self.config is None:
            raise ConfigError(f"{self.run_dir / CONFIG_RECORD} is missing: a run is resumed with its own config")
        check_known_keys(list(allowed))
        changes = config_differences(self.config, cfg)
        refused_keys = [key for key in changes if key not in OPERATIONAL_KEYS and key not in allowed]
        refused = [f"config {key}: {changes[key][0]!r} -> {changes[key][1]!r}" for key in refused_keys]
        data_lines = data_differences(self.data or _identity_from_config(self.config), data)
        if refused or data_lines:
            hints = []
            if refused:
                hints.append(f"to continue with the new values, add --allow-config-change {' '.join(refused_keys)} "
                             f"(recorded in {RUN_RECORD}); to continue unchanged, drop them (`--run-dir {self.run_dir} "
                             "--resume` alone uses the run's own config)")
            if data_lines:
                hints.append(f"a run continues only on the data it was trained on (data.path={self.config.data.path} "
                             "when it was last started): point data.path at that prepared folder, or start a new run")
            raise ResumeRefused(f"cannot resume {self.run_dir}: {len(refused) + len(data_lines)} difference(s) from "
                                "what the run was trained with:\n  " + "\n  ".join(refused + data_lines) + "\n"
                                + "\n".join(hints))
        return changes

    # ---------------------------------------------------------------------------- writing (rank 0)
    def write(self, cfg: Config, data: dict[str, Any], *, launch: dict | None, changes: dict[str, tuple[Any, Any]],
              step: int, allowed: list[str] | tuple[str, ...] = ()) -> None:
        """Record the run's config and data; an accepted change is appended with its step and time."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if changes:
            self.config_changes.append({
                "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "changes": {key: [old, new] for key, (old, new) in changes.items()},
                "accepted": {key: "--allow-config-change" if key in allowed else "operational" for key in changes}})
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        path = self.run_dir / CONFIG_RECORD
        if not path.is_file() or path.read_text() != text:
            write_text_atomic(path, text, durable=True)
        if self.data is None or not self.data.get("vocab_sha256"):
            self.data = data  # a new run, or one from before this record existed
        self.launch = launch if launch is not None else self.launch
        self.config = cfg
        record = {"format": RECORD_FORMAT, "data": self.data, "launch": self.launch,
                  "config_changes": self.config_changes}
        write_text_atomic(self.run_dir / RUN_RECORD, json.dumps(record, indent=2, ensure_ascii=False) + "\n",
                          durable=True)


@dataclass
class RunRecordUpdate:
    """What rank 0 records once the run has (re)started: the record as read, the data's identity, the
    launch and the accepted changes (written with the step they apply from)."""

    record: RunRecord
    data: dict[str, Any]
    launch: dict | None = None
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    allowed: tuple[str, ...] = ()

    def write(self, cfg: Config, step: int) -> None:
        self.record.write(cfg, self.data, launch=self.launch, changes=self.changes, step=step, allowed=self.allowed)

    def describe(self) -> list[str]:
        """One line per accepted change, for the run's log."""
        return [f"config change accepted ({'--allow-config-change' if key in self.allowed else 'operational'}): "
                f"{key}: {old!r} -> {new!r}" for key, (old, new) in self.changes.items()]


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether the run directory holds a checkpoint to resume from (a resume then follows its rules)."""
    root = checkpoint_root(Path(run_dir))
    if read_latest(root) is not None:
        return True
    return root.is_dir() and any(p.is_dir() and TAG_PATTERN.match(p.name) for p in root.iterdir())


def _set_size(cfg: Config, size: Any) -> None:
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r} (sizes: {', '.join(SIZES)})")
    cfg.size = size


def launch_record(config_path: str | None, overrides: list[str], size: str | None) -> dict:
    """What a fresh run was started from: the YAML as written, and the overrides."""
    return {"config_file": None if config_path is None else str(config_path),
            "config_yaml": None if config_path is None else read_yaml(config_path),
            "overrides": list(overrides), "size": size}
