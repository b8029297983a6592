"""Continued pretraining: ``--init-from DISC_DIR [--init-generator GEN_DIR]`` (electra_fast/init_from.py).

A tiny run is exported once; new runs start from that export and are checked at their first forward
(a trainer callback): the weights are the export's, the optimizer and the schedule are fresh. A folder
whose vocabulary is not the prepared data's is refused with one error naming both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from test_train import LAUNCH_ENV, TINY, clean_env, corpus_dir  # noqa: F401  (fixtures)

from electra_fast import train as trainer
from electra_fast.config import ConfigError
from electra_fast.model import split_qkv
from electra_fast.optim import lr_multiplier

FAST = ("train.max_steps=1", "train.log_every=1", "train.lr=0.003", "train.warmup_steps=2")


class FirstForward(trainer.TrainerCallback):
    """What the run holds at its first loss, before any update."""

    state: dict | None = None

    def on_loss(self, run: trainer.Trainer, loss: torch.Tensor) -> torch.Tensor:
        if self.state is None:
            model = run.module
            self.state = {network: {k: v.detach().clone() for k, v in
                                    split_qkv(model.network_state_dict(network)).items()}
                          for network in ("discriminator", "generator")}
            self.delta = getattr(model, "discriminator_word_embeddings_delta", None)
            self.delta = None if self.delta is None else self.delta.detach().clone()
            self.step, self.lr = run.step, run.engine.get_lr()[0]
            self.optimizer_state = len(run.engine.optimizer.state)
        return loss


def _main(data, run_dir, *flags, sets=(), callbacks=()) -> int:
    """The pretrain command line, run in this process (run_train: main() would end the process group
    that DeepSpeed keeps for the next in-process run)."""
    parser = argparse.ArgumentParser()
    trainer.add_train_arguments(parser)
    args = parser.parse_args(["--config", TINY, "--run-dir", str(run_dir), *flags, "--set", f"data.path={data}",
                              *FAST, *sets])
    return trainer.run_train(args, callbacks)


@pytest.fixture(scope="module")
def export(corpus_dir, tmp_path_factory):  # noqa: F811
    """An `electra-fast export` of a tiny run of two steps (with the data's vocab.txt)."""
    run = tmp_path_factory.mktemp("source") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _main(corpus_dir, run, sets=("train.max_steps=2",)) == 0
    finally:
        torch.set_num_threads(threads)
        for key in LAUNCH_ENV:
            os.environ.pop(key, None)
    return run / "export"


def _weights(folder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(folder / "model.safetensors").items() if k.startswith("electra.")}


def test_a_new_run_starts_from_the_export_with_a_fresh_optimizer(corpus_dir, export, tmp_path, clean_env,  # noqa: F811
                                                                  capsys):
    first = FirstForward()
    assert _main(corpus_dir, tmp_path / "run", "--init-from", str(export / "discriminator"), "--init-generator",
                 str(export / "generator"), callbacks=[first]) == 0
    assert f"weights from {export / 'discriminator'} + {export / 'generator'}" in capsys.readouterr().err
    for network in ("discriminator", "generator"):
        exported = _weights(export / network)
        ours = {"electra." + k: v for k, v in first.state[network].items()}
        assert ours.keys() == exported.keys()
        for key in exported:
            assert torch.equal(ours[key], exported[key]), (network, key)
    assert first.step == 0 and first.optimizer_state == 0  # a new run: no optimizer state...
    assert first.lr == pytest.approx(0.003 * lr_multiplier(0, 1, 2))  # ...and the schedule from its start
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "vocab_size: 300" in saved  # the run's config describes the imported model (resume rebuilds it)


def test_gdes_run_from_a_discriminator_alone(corpus_dir, export, tmp_path, clean_env):  # noqa: F811
    """No --init-generator: a fresh generator that shares the imported word table as E_gen, E_delta = 0."""
    first = FirstForward()
    assert _main(corpus_dir, tmp_path / "run", "--init-from", str(export / "discriminator"),
                 sets=("model.embedding_sharing=gdes",), callbacks=[first]) == 0
    exported = _weights(export / "discriminator")
    assert all(torch.equal(first.state["discriminator"][k[len("electra."):]], v) for k, v in exported.items())
    assert torch.equal(first.state["generator"]["embeddings.word_embeddings.weight"],
                       exported["electra.embeddings.word_embeddings.weight"])
    assert torch.count_nonzero(first.delta) == 0
    generator = _weights(export / "generator")
    key = "encoder.layer.0.intermediate.dense.weight"
    assert not torch.equal(first.state["generator"][key], generator["electra." + key])  # fresh, not imported


def _copy(folder, to):
    shutil.copytree(folder, to)
    return to


def test_a_vocabulary_that_is_not_the_datas_is_refused(corpus_dir, export, tmp_path, clean_env):  # noqa: F811
    bigger = _copy(export / "discriminator", tmp_path / "bigger")
    config = json.loads((bigger / "config.json").read_text())
    config["vocab_size"] = 320
    (bigger / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"--init-from .*size 320.* is not the prepared data's .*size 300"):
        _main(corpus_dir, tmp_path / "a", "--init-from", str(bigger))
    assert not (tmp_path / "a").exists()  # refused before anything was written

    swapped = _copy(export / "discriminator", tmp_path / "swapped")  # same size, [CLS] and [SEP] exchanged
    lines = (swapped / "vocab.txt").read_text().splitlines()
    cls, sep = lines.index("[CLS]"), lines.index("[SEP]")
    lines[cls], lines[sep] = lines[sep], lines[cls]
    (swapped / "vocab.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as refused:
        _main(corpus_dir, tmp_path / "b", "--init-from", str(swapped))
    assert f"'cls': {sep}" in str(refused.value) and f"'cls': {cls}" in str(refused.value)

    with pytest.raises(ConfigError, match="--init-generator needs --init-from"):
        _main(corpus_dir, tmp_path / "c", "--init-generator", str(export / "generator"))
