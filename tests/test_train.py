"""The DeepSpeed trainer (electra_fast/train.py and its ds_config, checkpoints, metrics modules) on the CPU.

Fast tests: the DeepSpeed-config merge, weight-decay groups, configs that must fail before any work,
and in-process single-rank runs (training, checkpoint pruning, export, non-finite handling).
Slow tests (multi-process): kill -9 and resume, ZeRO stages 0-3 on two ranks against a single process,
and a rank that dies under the deepspeed launcher.

Runs share one tiny prepared corpus (session fixture) and the tiny model (two layers, hidden 64).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from _faults import NonFiniteLossAt

from electra_fast import train as trainer
from electra_fast.checkpoints import add_export_arguments, consolidated_state_dict, run_export
from electra_fast.config import ConfigError, load_config
from electra_fast.ds_config import build_deepspeed_config, read_deepspeed_json
from electra_fast.metrics import read_metrics
from electra_fast.optim import lr_multiplier, weight_decay_groups

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "electra-tiny.yaml")
MODERN_TINY = str(REPO / "configs" / "modern-electra-tiny.yaml")  # model.architecture=modern
PYTHON = sys.executable
# The launcher's environment variables: an in-process run sets them, a child process must not inherit them.
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
              "CROSS_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE")
# Dropout off where runs with different rank layouts are compared; a learning rate that moves the loss.
COMPARE = ("model.dropout=0", "model.attention_dropout=0", "train.lr=0.003", "train.warmup_steps=2")


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> str:
    """A prepared corpus: 300-token vocabulary, 64-token examples, a few hundred examples."""
    from electra_fast.prepare import prepare

    import random

    rng = random.Random(0)
    subjects = ["the cat", "a dog", "the chef", "my friend", "the teacher", "a bird", "the child", "our neighbour"]
    verbs = ["ate", "cooked", "saw", "liked", "found", "painted", "carried", "washed"]
    objects = ["the meal", "a ball", "the fish", "an apple", "the book", "a chair", "the garden", "some bread"]
    places = ["in the kitchen", "at the park", "near the river", "in the house", "on the table", "by the road"]
    lines = []
    for _ in range(120):
        for _ in range(rng.randint(3, 8)):
            lines.append(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(places)}.")
        lines.append("")
    root = tmp_path_factory.mktemp("train_corpus")
    (root / "corpus.txt").write_text("\n".join(lines))
    out = prepare([str(root / "corpus.txt")], str(root / "data"), vocab_size=300, seq_len=64, num_proc=1,
                  verbose=False)
    return str(out)


@pytest.fixture
def clean_env(monkeypatch):
    """In-process runs set the launcher's variables (a group of one); undo that afterwards. One
    intra-op thread: on a shared, oversubscribed CI machine, OpenMP's spinning threads make the tiny
    model's matmuls ~20x slower than one thread does."""
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for key in LAUNCH_ENV:
        os.environ.pop(key, None)


def _args(run_dir, *sets, config=TINY, resume=False) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    trainer.add_train_arguments(parser)
    argv = ["--run-dir", str(run_dir)] + (["--config", config] if config else []) + (["--resume"] if resume else [])
    if sets:
        argv += ["--set", *sets]
    return parser.parse_args(argv)


def run_inprocess(data, run_dir, *sets, resume=False, config=TINY, callbacks=()) -> int:
    return trainer.run_train(_args(run_dir, f"data.path={data}", *sets, resume=resume, config=config), callbacks)


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# The DeepSpeed config: one place derives the shared values; contradictions are errors
# --------------------------------------------------------------------------------------------------
def _tiny(*sets):
    return load_config(TINY, list(sets))


def test_deepspeed_config_fills_auto_from_yaml():
    cfg = _tiny("train.global_batch_size=32", "train.gradient_accumulation_steps=2", "train.lr=3e-4",
                "train.warmup_steps=7", "train.max_steps=99", "train.grad_clip=0.5", "train.weight_decay=0.02")
    user, _ = read_deepspeed_json(str(REPO / "configs/deepspeed/zero2.json"))
    ds = build_deepspeed_config(cfg, user, world_size=4, device_type="cpu")
    layout = ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    assert layout == (32, 4, 2)
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # fp32 on the CPU
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-6,
                                                           "weight_decay": 0.02, "torch_adam": True}}
    assert "scheduler" not in ds  # "auto": the trainer passes optim's schedule to deepspeed.initialize
    assert ds["zero_optimization"]["stage"] == 2  # what the JSON alone decides passes through
    assert "auto" not in json.dumps(ds)
    assert user["train_batch_size"] == "auto"  # the JSON as read is not modified


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "zero3-offload", "zero1-node-local"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_shipped_deepspeed_config_resolves(name, device):
    user, _ = read_deepspeed_json(f"configs/deepspeed/{name}.json")
    ds = build_deepspeed_config(_tiny(), user, world_size=8, device_type=device)
    assert "auto" not in json.dumps(ds)
    assert ds["bf16"]["enabled"] is (device == "cuda")  # bf16 on GPU, fp32 on CPU by default
    offload = name.endswith("offload")
    assert ds["optimizer"]["params"]["torch_adam"] is (not offload)  # DeepSpeed's CPU Adam under offload
    assert ds["optimizer"]["params"].get("fused", False) is (device == "cuda" and not offload)
    assert ds["zero_optimization"]["stage"] == int(name[4])


def test_deepspeed_config_precision_and_lamb():
    user = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto", "loss_scale": 0}}
    ds = build_deepspeed_config(_tiny("train.precision=fp16", "train.optimizer=lamb"), user,
                                world_size=1, device_type="cuda")
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0} and ds["bf16"]["enabled"] is False
    assert ds["optimizer"]["type"] == "Lamb" and "torch_adam" not in ds["optimizer"]["params"]
    ds = build_deepspeed_config(_tiny(), {}, world_size=1, device_type="cuda", bf16_supported=False)
    assert ds["fp16"]["enabled"] is True  # auto on a GPU without bf16 (V100, T4)
    with pytest.raises(ConfigError, match="FusedLamb"):
        build_deepspeed_config(_tiny("train.optimizer=lamb"), {}, world_size=1, device_type="cpu")


@pytest.mark.parametrize("json_values, message", [
    ({"train_batch_size": 64}, r"'train_batch_size' is 64 but the YAML gives 8 \(from train.global_batch_size\)"),
    ({"gradient_clipping": 2.0}, r"'gradient_clipping' is 2.0 .* train.grad_clip"),
    ({"optimizer": {"type": "Adam", "params": {}}}, r"'optimizer.type' is 'Adam' .* train.optimizer"),
    ({"optimizer": {"params": {"lr": 0.1}}}, r"'optimizer.params.lr' is 0.1 .* train.lr"),
    ({"bf16": {"enabled": True}}, r"'bf16.enabled' is True .* train.precision \(fp32\)"),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 5}}},
     r"total_num_steps' is 5 .* train.max_steps"),
    ({"scheduler": {"params": {"total_num_steps": 5}}}, r"'scheduler.params' is given but 'scheduler.type' is not"),
    ({"zero_optimization": {"stage": "auto"}}, r"no value for \"auto\" at zero_optimization.stage"),
])
def test_deepspeed_config_contradiction_is_an_error(json_values, message):
    with pytest.raises(ConfigError, match=message):
        build_deepspeed_config(_tiny(), json_values, world_size=1, device_type="cpu", source="ds.json")


def test_deepspeed_config_equal_explicit_values_and_json_micro_batch():
    cfg = _tiny("train.global_batch_size=32")
    ds = build_deepspeed_config(cfg, {"train_batch_size": 32, "gradient_clipping": 1,
                                      "train_micro_batch_size_per_gpu": 4}, world_size=2, device_type="cpu")
    assert ds["gradient_accumulation_steps"] == 4  # the JSON's micro batch fills the YAML's "derive"
    with pytest.raises(ConfigError, match="inconsistent batch sizes|not divisible"):
        build_deepspeed_config(cfg, {"train_micro_batch_size_per_gpu": 5}, world_size=2, device_type="cpu")
    with pytest.raises(ConfigError, match="not divisible"):
        build_deepspeed_config(cfg, {}, world_size=3, device_type="cpu")


def test_explicit_deepspeed_scheduler_is_kept_and_filled_from_yaml():
    cfg = _tiny("train.lr=3e-4", "train.warmup_steps=7", "train.max_steps=99")
    ds = build_deepspeed_config(cfg, {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": "auto"}}},
                                world_size=1, device_type="cpu")
    assert ds["scheduler"] == {"type": "WarmupDecayLR", "params": {
        "warmup_max_lr": 3e-4, "warmup_min_lr": 0, "warmup_num_steps": 7, "total_num_steps": 99,
        "warmup_type": "linear"}}
    ds = build_deepspeed_config(cfg, {"scheduler": {"type": "OneCycle", "params": {"cycle_max_lr": 1e-3}}},
                                world_size=1, device_type="cpu")
    assert ds["scheduler"] == {"type": "OneCycle", "params": {"cycle_max_lr": 1e-3}}  # DeepSpeed's business


def test_schedule_resumes_from_its_own_and_from_deepspeed_warmupdecaylr_state():
    from electra_fast.optim import lr_multiplier, warmup_decay_schedule

    def schedule():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        return optimizer, warmup_decay_schedule(optimizer, total_steps=10, warmup_steps=4)

    optimizer, ours = schedule()
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        ours.step()
    assert seen == pytest.approx([2.0 * lr_multiplier(t, 10, 4) for t in range(6)])
    assert seen[3] == pytest.approx(2.0 * 0.7)  # the peak (t+1 = W) times the decay 1 - 3/10
    optimizer, resumed = schedule()
    resumed.load_state_dict(ours.state_dict())
    optimizer, old = schedule()
    old.load_state_dict({"last_batch_iteration": 5})  # DeepSpeed's WarmupDecayLR after 6 updates
    for other in (resumed, old):  # both continue with the 7th update's lr
        assert other.last_epoch == ours.last_epoch == 6
        other.step()
        assert other.get_last_lr() == pytest.approx([2.0 * lr_multiplier(7, 10, 4)])


def test_retired_config_key_is_ignored_when_read_back_but_not_accepted_anew(tmp_path, caplog):
    saved = load_config(TINY).to_dict()
    saved["train"]["inject_nonfinite_at"] = [2]  # what a run dir's config.yaml of an earlier version may hold
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    with caplog.at_level("WARNING", logger="electra_fast.config"):
        cfg = load_config(tmp_path / "config.yaml")
    assert cfg.to_dict() == load_config(TINY).to_dict()
    assert "ignoring the retired key train.inject_nonfinite_at" in caplog.text
    from electra_fast.config import config_from_dict

    assert config_from_dict(saved).to_dict() == cfg.to_dict()  # a checkpoint's config sidecar
    with pytest.raises(ConfigError, match="unknown config key 'train.inject_nonfinite_at'"):
        load_config(TINY, ["train.inject_nonfinite_at=[2]"])


def test_weight_decay_groups_follow_the_reference():
    from electra_fast.model import ElectraPretrainingModel

    model = ElectraPretrainingModel(_tiny())
    decay, no_decay = weight_decay_groups(model.named_parameters(), 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "embeddings.word_embeddings.weight" in decayed  # the reference decays the embeddings
    assert "embeddings.LayerNorm.weight" in kept and "generator_lm_head_bias" in kept
    assert all("LayerNorm" in n or "bias" in n for n in kept)
    assert not any("LayerNorm" in n or "bias" in n for n in decayed)
    assert len(decayed) + len(kept) == len(list(model.parameters()))


# --------------------------------------------------------------------------------------------------
# Bad configs fail before any work, with one clear line
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sets, message", [
    (["train.no_such_key=1"], "unknown config key 'train.no_such_key'"),
    (["train.global_batch_size=8", "train.micro_batch_size=3"], "not divisible by micro_batch_size=3"),
    (["train.global_batch_size=8", "train.micro_batch_size=2", "train.gradient_accumulation_steps=2"],
     "inconsistent batch sizes"),
    (["model.vocab_size=512"], "vocabulary mismatch: the prepared data uses 300 tokens"),
    (["data.seq_len=32"], "prepared with seq_len=64"),
    (["train.deepspeed_config=configs/deepspeed/nope.json"], "nope.json, and not the name of a shipped config"),
])
def test_bad_config_fails_fast(corpus_dir, tmp_path, capsys, clean_env, sets, message):
    argv = ["--config", TINY, "--run-dir", str(tmp_path / "run"), "--set", f"data.path={corpus_dir}", *sets]
    assert trainer.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_missing_data_dir_and_existing_run_fail_fast(corpus_dir, tmp_path, capsys, clean_env):
    assert trainer.main(["--config", TINY, "--run-dir", str(tmp_path / "r"), "--set",
                         f"data.path={tmp_path / 'missing'}"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert trainer.main(["--config", TINY, "--run-dir", str(tmp_path / "r")]) == 2
    assert "data.path is not set" in capsys.readouterr().err
    (tmp_path / "r" / "checkpoints" / "step-00000001").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "latest").write_text("step-00000001")
    assert trainer.main(["--config", TINY, "--run-dir", str(tmp_path / "r"), "--set", f"data.path={corpus_dir}"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert trainer.main(["--run-dir", str(tmp_path / "fresh")]) == 2
    assert "--config or --size is required" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# One process (in this process): train, checkpoint, prune, export; skip and stop on non-finite losses
# --------------------------------------------------------------------------------------------------
def test_single_process_run_writes_everything_and_exports(corpus_dir, tmp_path, clean_env):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    assert run_inprocess(corpus_dir, run, "train.max_steps=4", "train.save_every=2", "train.keep_last=1",
                         "train.log_every=1", "train.lr=0.003", "train.warmup_steps=1") == 0
    for name in ("config.yaml", "deepspeed.json", "env.json", "metrics.jsonl", "curves.png"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    env = json.loads((run / "env.json").read_text())
    assert env["versions"]["deepspeed"] and env["world_size"] == 1 and "git_commit" in env
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["tokens_seen"] > 0 and records[-1]["grad_norm"] > 0
    # The one schedule (optim.lr_multiplier), logged after each step: the lr of the next update.
    assert [r["lr"] for r in records] == pytest.approx([0.003 * lr_multiplier(r["step"], 4, 1) for r in records])
    assert records[0]["lr"] > 0 and records[-1]["lr"] == 0
    assert {"gen_accuracy", "disc_accuracy", "seq_per_s", "tokens_per_s", "tflops", "mfu", "eta_s"} <= set(records[0])
    # keep_last=1: only the final checkpoint remains, and `latest` names it
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step-00000004"]
    assert (ckpts / "latest").read_text() == "step-00000004"
    cfg = load_config(run / "config.yaml")
    assert cfg.model.vocab_size == 300  # taken from the data

    # The export is the consolidated checkpoint, loadable by transformers with the same outputs.
    from transformers import ElectraForPreTraining

    from electra_fast.model import ElectraPretrainingModel

    ours = ElectraPretrainingModel(cfg).eval()
    ours.load_state_dict(consolidated_state_dict(ckpts / "step-00000004"))
    exported = load_file(run / "export" / "discriminator" / "model.safetensors")
    torch.testing.assert_close(exported["electra.embeddings.word_embeddings.weight"],
                               ours.embeddings.word_embeddings.weight.detach())
    hf = ElectraForPreTraining.from_pretrained(run / "export" / "discriminator").eval()
    ids = torch.randint(5, 300, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    with torch.no_grad():
        expected = ours.discriminator_logits(ids, mask)
        got = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-5)

    # The demo's table reads the same export (the sentence is in the corpus's style; word 2 replaced).
    from electra_fast.demo import demo_summary

    table = io.StringIO()
    rows = demo_summary(run, "the chef cooked the meal in the kitchen .", {2: "painted"}, out=table)
    assert [r["token"] for r in rows][:4] == ["the", "chef", "painted", "the"]
    assert [r["replaced"] for r in rows] == [r["word"] == 2 for r in rows]
    assert all(0.0 < r["p_replaced"] < 1.0 for r in rows)
    assert "P(replaced)" in table.getvalue() and "generator's top-3 for [MASK] at 'cooked'" in table.getvalue()

    # `electra-fast export --checkpoint RUN --out DIR` does the same from the run dir
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    assert run_export(parser.parse_args(["--checkpoint", str(run), "--out", str(tmp_path / "again")])) == 0
    again = load_file(tmp_path / "again" / "discriminator" / "model.safetensors")
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in again)


def test_bf16_run_exports_the_fp32_master_weights(corpus_dir, tmp_path, clean_env):
    """bf16 (DeepSpeed's CPU accelerator has it): ZeRO-0 keeps bf16 weights in the module and fp32
    masters in its optimizer wrapper; the export must take the masters."""
    run = tmp_path / "bf16"
    assert run_inprocess(corpus_dir, run, "train.precision=bf16", "train.max_steps=2", "train.lr=0.003",
                         "train.warmup_steps=1", "train.export_at_end=false") == 0
    assert json.loads((run / "deepspeed.json").read_text())["bf16"]["enabled"] is True
    tag = run / "checkpoints" / "step-00000002"
    module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    weights = consolidated_state_dict(tag)
    assert module.keys() == weights.keys()
    name = "embeddings.word_embeddings.weight"
    assert module[name].dtype == torch.bfloat16 and weights[name].dtype == torch.float32
    assert not torch.equal(weights[name], module[name].float())  # more precise than the bf16 copy...
    for key in module:  # ...and exactly what the bf16 copy was rounded from
        assert torch.equal(weights[key].to(torch.bfloat16), module[key]), key


def test_explicit_deepspeed_scheduler_runs_and_is_checkpointed(corpus_dir, tmp_path, clean_env):
    user, _ = read_deepspeed_json(str(REPO / "configs/deepspeed/zero0.json"))
    user["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": "auto",
                                                             "total_num_steps": "auto"}}
    (tmp_path / "ds.json").write_text(json.dumps(user))
    run = tmp_path / "run"
    assert run_inprocess(corpus_dir, run, f"train.deepspeed_config={tmp_path / 'ds.json'}", "train.max_steps=3",
                         "train.log_every=1", "train.lr=0.003", "train.warmup_steps=2",
                         "train.export_at_end=false") == 0
    assert json.loads((run / "deepspeed.json").read_text())["scheduler"]["type"] == "WarmupDecayLR"
    # DeepSpeed's formula, not optim's: 0 during its first update, then (t-1)/W, then (T-t+1)/(T-W)
    assert [r["lr"] for r in read_metrics(run) if "loss" in r] == pytest.approx([0.0, 0.0015, 0.003])
    state = torch.load(run / "checkpoints" / "step-00000003" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=True)
    assert state["lr_scheduler"] == {"last_batch_iteration": 2}


@pytest.mark.parametrize("zero", [0, 1])  # ZeRO-0 fp32: our guard on the torch optimizer; ZeRO-1: DeepSpeed's
def test_nonfinite_loss_is_skipped_then_stops(corpus_dir, tmp_path, capsys, clean_env, zero):
    common = (f"train.deepspeed_config=configs/deepspeed/zero{zero}.json", "train.log_every=1",
              "train.export_at_end=false", "train.lr=0.003", "train.warmup_steps=1")
    # One bad step: skipped (weights and LR schedule unchanged), training goes on.
    run = tmp_path / "one"
    assert run_inprocess(corpus_dir, run, *common, "train.max_steps=4", callbacks=[NonFiniteLossAt({2})]) == 0
    records = read_metrics(run)
    events = [r for r in records if r.get("event") == "nonfinite_skipped"]
    assert [(e["step"], e["cause"], e["streak"]) for e in events] == [(2, "loss", 1)]
    by_step = {r["step"]: r for r in records if "loss" in r}
    assert by_step[2]["nonfinite_micro_steps"] == 1 and by_step[4]["skipped_steps"] == 1
    assert by_step[2]["lr"] == by_step[1]["lr"]  # the schedule did not advance on the skipped step
    assert all(torch.isfinite(torch.tensor(by_step[s]["loss"])) for s in (1, 3, 4))

    # K in a row: the run stops with a clear message and leaves the last checkpoint alone.
    run = tmp_path / "many"
    code = run_inprocess(corpus_dir, run, *common, "train.max_steps=10", "train.save_every=2",
                         "train.max_nonfinite_steps=3", callbacks=[NonFiniteLossAt({3, 4, 5, 6})])
    assert code == 1
    err = capsys.readouterr().err
    assert "stopping at step 5: 3 optimizer steps in a row had a non-finite loss" in err
    assert (run / "checkpoints" / "latest").read_text() == "step-00000004"
    assert not (run / "checkpoints" / "step-00000006").exists()


# --------------------------------------------------------------------------------------------------
# Crash and resume: kill -9 after a checkpoint, then --resume reproduces the uninterrupted run
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("config", [TINY, MODERN_TINY], ids=["electra", "modern"])
def test_kill9_then_resume_matches_uninterrupted_run(corpus_dir, tmp_path, clean_env, config):
    sets = ("train.max_steps=7", "train.save_every=3", "train.log_every=1", "train.export_at_end=false",
            "train.lr=0.003", "train.warmup_steps=2")  # dropout on: its RNG must be restored too
    reference = tmp_path / "reference"
    assert run_inprocess(corpus_dir, reference, *sets, config=config) == 0

    run = tmp_path / "killed"
    # `python -m electra_fast.train` with a fault callback: the process kills itself with SIGKILL after step 5
    cmd = [PYTHON, str(REPO / "tests" / "_faults.py"), "--fault", "sigkill@5", "--", "--config", config,
           "--run-dir", str(run), "--set", f"data.path={corpus_dir}", *sets]
    env = child_env()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text() == "step-00000003"
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]  # 4, 5 are lost with the kill
    # A save that died half-way leaves a .tmp folder that resume removes and never loads; a record cut
    # short by the kill is dropped.
    (run / "checkpoints" / "step-00000006.tmp").mkdir()
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "loss": 3')

    assert run_inprocess(corpus_dir, run, resume=True, config=None) == 0  # the run dir's config.yaml
    assert not (run / "checkpoints" / "step-00000006.tmp").exists()
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 8))
    assert losses(run) == losses(reference)  # bit for bit: weights, optimizer, LR, data, masks, dropout
    ref_state = consolidated_state_dict(reference / "checkpoints" / "step-00000007")
    state = consolidated_state_dict(run / "checkpoints" / "step-00000007")
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


# --------------------------------------------------------------------------------------------------
# Two ranks (gloo on the CPU) under the deepspeed launcher
# --------------------------------------------------------------------------------------------------
def _deepspeed_launch(args: list[str], extra_env: dict | None = None, timeout: int = 600):
    env = child_env()
    env.update(extra_env or {})
    cmd = [PYTHON, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def two_rank_launch(corpus_dir, tmp_path_factory):
    """One launch of two ranks: a short run per ZeRO stage (ZeRO-3 with activation checkpointing), then
    a run in which rank 1 raises after step 2. Returns (launcher process, output folder)."""
    out = tmp_path_factory.mktemp("two_ranks")
    proc = _deepspeed_launch([str(REPO / "tests" / "_train_zero_stages.py"), "--data", corpus_dir,
                              "--out", str(out), "--stages", "0", "1", "2", "3", "--checkpointing-stages", "3",
                              "--then-fail-rank", "1", "--set", *STAGE_SETS])
    return proc, out


STAGE_STEPS = 4
STAGE_SETS = (*COMPARE, f"train.max_steps={STAGE_STEPS}", "train.log_every=1", f"train.save_every={STAGE_STEPS}")


@pytest.mark.slow
def test_zero_stages_on_two_ranks_match_single_process(two_rank_launch, corpus_dir, tmp_path, clean_env):
    proc, out = two_rank_launch
    runs = {stage: out / f"zero{stage}" for stage in range(4)}
    for stage, run in runs.items():
        assert (run / "checkpoints" / "latest").is_file(), (stage, (proc.stdout + proc.stderr)[-5000:])
    reference = losses(runs[0])
    assert len(reference) == STAGE_STEPS
    assert json.loads((runs[0] / "env.json").read_text())["world_size"] == 2
    # Same ranks, same data, same masks: every ZeRO stage computes the same losses (ZeRO-3 with
    # activation checkpointing: recomputation under partitioned parameters changes nothing either)...
    for stage in (1, 2, 3):
        torch.testing.assert_close(torch.tensor(losses(runs[stage])), torch.tensor(reference), rtol=2e-5, atol=0)
    # ...and the same weights after the last step (ZeRO-3's are consolidated from its partitions).
    ref_state = consolidated_state_dict(runs[0] / "checkpoints" / f"step-{STAGE_STEPS:08d}")
    for stage in (1, 2, 3):
        state = consolidated_state_dict(runs[stage] / "checkpoints" / f"step-{STAGE_STEPS:08d}")
        assert state.keys() == ref_state.keys()
        for key in ref_state:
            torch.testing.assert_close(state[key], ref_state[key], rtol=1e-4, atol=1e-6, msg=key)
        assert (runs[stage] / "export" / "generator" / "model.safetensors").is_file()
    # One process with the same global batch sees the same examples, but each rank draws its own
    # masks, so the losses agree to within the masking noise (~0.1%), not bit for bit.
    single = tmp_path / "single"
    assert run_inprocess(corpus_dir, single, *STAGE_SETS) == 0
    torch.testing.assert_close(torch.tensor(reference), torch.tensor(losses(single)), rtol=5e-3, atol=0)


@pytest.mark.slow
def test_a_dying_rank_fails_the_launch_with_its_error(two_rank_launch):
    proc, out = two_rank_launch
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "injected failure on rank 1 after step 2" in output
    assert (out / "failing" / "metrics.jsonl").is_file()  # the failing run did start
