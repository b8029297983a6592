"""The trainer's fast step (issue 15, trainer side), on the CPU under DeepSpeed's CPU accelerator.

* the loader's host-side packed sizes reach the engine: a trainer micro-step on the kernels' packed
  layout makes no would-be host-device synchronisation (the counter of tests/test_step_sync.py);
* ``train.compile``: a compiled run (``aot_eager``, installed by monkeypatching the trainer's
  ``compile_model``; no test-only config key) gives the eager run's losses;
* the DeepSpeed config derived for CUDA asks for torch's fused AdamW with the paper's hyper-parameters,
  and DeepSpeed builds exactly that optimizer from it;
* a checkpoint written before QKV fusion (separate query/key/value) resumes its weights, step and LR
  schedule with a fresh optimizer state and one warning.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from test_step_sync import sync_counter  # noqa: F401 (the fixture)
from test_train import REPO, TINY, clean_env, corpus_dir, losses, run_inprocess  # noqa: F401 (fixtures)

from electra_fast import step as step_module
from electra_fast import train as trainer
from electra_fast.config import load_config
from electra_fast.ds_config import build_deepspeed_config, read_deepspeed_json
from electra_fast.metrics import read_metrics
from electra_fast.model import QKV_NAMES, has_unfused_qkv, packed_sizes

NO_DROPOUT = ("model.dropout=0", "model.attention_dropout=0")
# Every hot spot on its Triton kernel (interpreter): the packed layout, the one whose sizes matter.
KERNELS = tuple(f"model.{spot}_impl=triton" for spot in ("attention", "mlm_head", "disc_head", "elementwise"))


def _trainer(corpus_dir, run_dir, *sets) -> trainer.Trainer:
    cfg = load_config(TINY, [f"data.path={corpus_dir}", "data.num_workers=0", *sets])
    manifest = trainer.apply_data_manifest(cfg)
    ds_user, ds_path = read_deepspeed_json(cfg.train.deepspeed_config)
    return trainer.Trainer(cfg, run_dir, ds_user, ds_path, manifest, local_rank=-1)


# --------------------------------------------------------------------------------------------------
# No host-device synchronisation in the trainer's step
# --------------------------------------------------------------------------------------------------
def test_trainer_micro_step_has_no_host_sync(corpus_dir, tmp_path, clean_env, sync_counter):  # noqa: F811
    # ZeRO-1: DeepSpeed's optimizer wrapper checks the gradients itself (ZeRO-0 fp32 has our one
    # deliberate per-step check, _guard_plain_optimizer). A small model: the kernels are interpreted.
    run = _trainer(corpus_dir, tmp_path / "run", *KERNELS, *NO_DROPOUT, "model.num_layers=1",
                   "train.global_batch_size=2", "train.deepspeed_config=configs/deepspeed/zero1.json")
    batches = iter(run.loader)
    first = next(batches)
    assert first["packed_sizes"] == packed_sizes(first["attention_mask"])  # computed by the loader, on the host
    assert run.module._layout(first["attention_mask"], **first["packed_sizes"]).packed

    def replay(batch):
        yield batch

    run.engine.train()
    sync_counter.clear()
    run._micro_step(replay(first))  # forward, statistics, backward, optimizer step: what the loop runs
    assert not sync_counter, dict(sync_counter)

    # The same step without the loader's sizes reads them from the device: the counter sees it.
    without = {key: value for key, value in first.items() if key != "packed_sizes"}
    run._micro_step(replay(without))
    assert sum(sync_counter.values()) >= 2, dict(sync_counter)


# --------------------------------------------------------------------------------------------------
# train.compile: the compiled trainer trains like the eager one
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero", [0, pytest.param(3, marks=pytest.mark.slow)])  # ZeRO-3: gathering hooks
def test_compiled_training_gives_the_eager_losses(corpus_dir, tmp_path, clean_env, monkeypatch, capsys, zero):
    # aot_eager: the captured graphs run without inductor (whose C++ builds take minutes on the CPU).
    monkeypatch.setattr(trainer, "compile_model", functools.partial(step_module.compile_model, backend="aot_eager"))
    common = (*NO_DROPOUT, "model.num_layers=1", "train.max_steps=3", "train.log_every=1", "train.lr=0.003",
              "train.warmup_steps=1", "train.export_at_end=false",
              f"train.deepspeed_config=configs/deepspeed/zero{zero}.json")
    torch._dynamo.reset()
    assert run_inprocess(corpus_dir, tmp_path / "eager", *common) == 0
    assert "torch.compile" not in "".join(capsys.readouterr())
    assert run_inprocess(corpus_dir, tmp_path / "compiled", *common, "train.compile=default") == 0
    assert "torch.compile default" in "".join(capsys.readouterr())  # the run's banner says what it did
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == 3 and eager[0] != eager[-1]
    assert compiled == pytest.approx(eager, rel=1e-5)
    # The in-place compile leaves the parameter names alone: the checkpoints have the same keys.
    def keys(run):
        (path,) = (run / "checkpoints" / "step-00000003").glob("*mp_rank_00_model_states.pt")
        state = torch.load(path, map_location="cpu", weights_only=True)
        return set(state["module"])

    assert keys(tmp_path / "compiled") == keys(tmp_path / "eager") and keys(tmp_path / "eager")
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# The fused optimizer on CUDA
# --------------------------------------------------------------------------------------------------
def test_cuda_deepspeed_config_is_fused_adamw_with_the_paper_hyperparameters(clean_env):
    cfg = load_config(str(REPO / "configs" / "electra-small.yaml"))
    user, _ = read_deepspeed_json(str(REPO / "configs" / "deepspeed" / "zero1.json"))
    ds = build_deepspeed_config(cfg, user, world_size=1, device_type="cuda")
    # The paper's AdamW (ELECTRA-Small: lr 5e-4, betas 0.9/0.999, eps 1e-6, weight decay 0.01), run by
    # torch's fused multi-tensor kernel (one launch per parameter group, no DeepSpeed JIT op).
    assert ds["optimizer"] == {"type": "AdamW", "params": {
        "lr": 5e-4, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01, "torch_adam": True, "fused": True}}
    assert ds["bf16"]["enabled"] is True

    # DeepSpeed turns that section into torch.optim.AdamW(fused=True) (torch's fused AdamW runs on the
    # CPU as well, so the construction is checked here; ZeRO-0 fp32 hands back the torch optimizer).
    import deepspeed

    from electra_fast.distributed import init_distributed
    from electra_fast.model import ElectraPretrainingModel
    from electra_fast.optim import weight_decay_groups

    init_distributed(-1)
    model = ElectraPretrainingModel(load_config(TINY))
    cpu_ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "optimizer": ds["optimizer"]}
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=weight_decay_groups(model.named_parameters(), 0.01), config=cpu_ds)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["fused"] is True
    assert tuple(optimizer.defaults["betas"]) == (0.9, 0.999)
    assert optimizer.defaults["eps"] == 1e-6 and optimizer.defaults["lr"] == 5e-4
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]


# --------------------------------------------------------------------------------------------------
# Resuming a checkpoint written before QKV fusion
# --------------------------------------------------------------------------------------------------
def _unfused_names(names) -> list[str]:
    return [name.replace(".qkv.", f".{part}.") for name in names
            for part in (QKV_NAMES if ".attention.self.qkv." in name else ("qkv",))]


def _unfuse_checkpoint(tag_dir) -> None:
    """Rewrite a checkpoint's model states as the pre-fusion code wrote them: query/key/value parameters
    (each of the fused weight's thirds), listed so in the parameter shapes, and (ZeRO-0) an optimizer
    state laid out per those parameters."""
    path = tag_dir / "mp_rank_00_model_states.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    module = {}
    for name, tensor in state["module"].items():
        if ".attention.self.qkv." in name:
            for part, chunk in zip(QKV_NAMES, tensor.chunk(3, dim=0)):
                module[name.replace(".qkv.", f".{part}.")] = chunk.clone()
        else:
            module[name] = tensor
    state["module"] = module
    if state.get("param_shapes"):  # ZeRO 1-3: the names of each flat partition's parameters
        state["param_shapes"] = [{name: module[name].shape for name in _unfused_names(group)}
                                 for group in state["param_shapes"]]
    optimizer = state.get("optimizer")
    if isinstance(optimizer, dict) and "param_groups" in optimizer:
        # The old optimizer had 2 more parameters per fused one: pad its per-parameter state positionally
        # (the layout a positional restore would have misread).
        extra = sum(1 for name in module if ".attention.self.key." in name or ".attention.self.value." in name)
        count = sum(len(group["params"]) for group in optimizer["param_groups"])
        first_group = optimizer["param_groups"][0]
        first_group["params"] = list(first_group["params"]) + list(range(count, count + extra))
    torch.save(state, path)
    # The pre-fusion code wrote no checksum manifest either: such folders resume after a weights-only check.
    (tag_dir / "checkpoint.json").unlink()


@pytest.mark.parametrize("zero", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_resume_of_a_checkpoint_from_before_qkv_fusion(corpus_dir, tmp_path, clean_env, caplog, zero):
    from electra_fast.checkpoints import checkpoint_has_unfused_qkv

    common = (*NO_DROPOUT, "train.lr=0.003", "train.warmup_steps=2", "train.log_every=1", "train.save_every=2",
              "train.export_at_end=false", f"train.deepspeed_config=configs/deepspeed/zero{zero}.json")
    run_dir = tmp_path / "run"
    assert run_inprocess(corpus_dir, run_dir, *common, "train.max_steps=2") == 0
    tag = run_dir / "checkpoints" / "step-00000002"
    saved = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    assert not checkpoint_has_unfused_qkv(tag)
    _unfuse_checkpoint(tag)
    assert checkpoint_has_unfused_qkv(tag)

    caplog.set_level(logging.WARNING)
    run = _trainer(corpus_dir, run_dir, *common, "train.max_steps=4")
    run.resume()
    warnings = [r.getMessage() for r in caplog.records if "predates fused QKV" in r.getMessage()]
    assert len(warnings) == 1 and "not its optimizer state" in warnings[0], warnings
    # The weights are the saved ones (fused back by the model's load hook), exactly.
    weights = run.module.state_dict()
    assert set(weights) == set(saved["module"])
    for name, tensor in saved["module"].items():
        assert torch.equal(weights[name], tensor), name
    # The optimizer starts afresh (ZeRO-0: empty; ZeRO-1: its fp32 partitions are the loaded weights);
    # the step and the LR schedule resume where they were.
    if zero == 0:
        assert not run.engine.optimizer.state
    else:  # one rank: the fp32 master partition is the whole flat weight buffer, as loaded
        zero_optimizer = run.engine.optimizer
        for masters, weights in zip(zero_optimizer.single_partition_of_fp32_groups,
                                    zero_optimizer.parallel_partitioned_bit16_groups):
            assert torch.equal(masters, weights[0])
    assert run.step == 2 and run.engine.lr_scheduler.state_dict() == saved["lr_scheduler"]

    # And training goes on from there, writing fused checkpoints again.
    assert run.run()["step"] == 4
    records = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    assert sorted(records) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records.values())
    final = torch.load(run_dir / "checkpoints" / "step-00000004" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=True)
    assert not has_unfused_qkv(final["module"]) and set(final["module"]) == set(saved["module"])
    if zero == 0:
        assert final["optimizer"]["state"]  # the new optimizer state, per fused parameter
