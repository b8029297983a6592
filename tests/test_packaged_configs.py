"""What an installed package carries: the DeepSpeed configs by name, and the named sizes with no file.

configs/ in the repository is the readable copy; these tests keep it equal to what ships."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from electra_fast.config import SIZES, ConfigError, load_config
from electra_fast.ds_config import find_deepspeed_config, packaged_deepspeed_configs, read_deepspeed_json

REPO = Path(__file__).resolve().parents[1]
REPO_COPIES = REPO / "configs" / "deepspeed"


def test_the_shipped_deepspeed_configs_equal_the_repository_copies():
    shipped = packaged_deepspeed_configs()
    assert sorted(shipped) == sorted(p.stem for p in REPO_COPIES.glob("*.json"))
    for name, resource in shipped.items():
        assert resource.read_bytes() == (REPO_COPIES / f"{name}.json").read_bytes(), name


# The paper-size YAMLs are readable copies of the named sizes; the tiny ones are the tests' configs and
# turn dropout on where a size's own default leaves it off (modern-tiny), so they are not copies.
YAML_OF_SIZE = {size: f"{'modern-electra-' + size[len('modern-'):] if size.startswith('modern-') else 'electra-' + size}.yaml"
                for size in SIZES if not size.endswith("tiny")}


@pytest.mark.parametrize("size", sorted(YAML_OF_SIZE))
def test_each_size_yaml_resolves_to_the_named_size(size):
    """configs/electra-SIZE.yaml (modern-electra-SIZE.yaml) says nothing that --size SIZE alone does not."""
    assert load_config(REPO / "configs" / YAML_OF_SIZE[size]).to_dict() == load_config(size=size).to_dict()


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_size_names_a_shipped_deepspeed_config(size):
    values, _ = read_deepspeed_json(load_config(size=size).train.deepspeed_config)
    assert "zero_optimization" in values


def test_a_name_works_from_any_directory_and_a_user_path_still_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert read_deepspeed_json("zero3-offload")[0]["zero_optimization"]["stage"] == 3
    # Older configs and run dirs hold the repository path; away from a checkout it is the shipped copy.
    assert read_deepspeed_json("configs/deepspeed/zero2.json")[0]["zero_optimization"]["stage"] == 2
    own = tmp_path / "mine.json"
    own.write_text('{"zero_optimization": {"stage": 3}, "gradient_clipping": 0.5}')
    values, found = read_deepspeed_json("mine.json")
    assert values["gradient_clipping"] == 0.5 and Path(found) == Path("mine.json")


def test_a_users_file_named_like_the_repository_copy_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "deepspeed").mkdir(parents=True)
    (tmp_path / "configs" / "deepspeed" / "zero1.json").write_text('{"gradient_clipping": 0.25}')
    assert read_deepspeed_json("configs/deepspeed/zero1.json")[0] == {"gradient_clipping": 0.25}


@pytest.mark.parametrize("missing", ["zero9", "configs/deepspeed/zero9.json", "nowhere/mine.json"])
def test_an_unknown_name_or_missing_file_lists_the_shipped_names(missing, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="train.deepspeed_config: no such file.*zero0, zero1, zero1-node-local, zero2, zero3, zero3-offload"):
        find_deepspeed_config(missing)
    assert os.listdir(tmp_path) == []


def test_config_command_prints_a_named_size_without_a_file(capsys):
    from electra_fast.cli import main

    assert main(["config", "--size", "base", "--set", "train.lr=1e-4"]) == 0
    text = capsys.readouterr().out
    assert "hidden_size: 768" in text and "lr: 0.0001" in text and "deepspeed_config: zero1" in text


def test_pretrain_takes_a_size_without_a_config(tmp_path):
    import argparse

    from electra_fast import train as trainer

    parser = argparse.ArgumentParser()
    trainer.add_train_arguments(parser)
    args = parser.parse_args(["--size", "tiny", "--run-dir", str(tmp_path / "r"), "--set", "train.lr=0.01"])
    cfg, launch = trainer.resolve_train_config(args)
    assert cfg.size == "tiny" and cfg.train.lr == 0.01 and cfg.train.deepspeed_config == "zero0"
    assert launch == {"config_file": None, "config_yaml": None, "overrides": ["train.lr=0.01"], "size": "tiny"}
    args = parser.parse_args(["--run-dir", str(tmp_path / "r")])
    with pytest.raises(ConfigError, match="--config or --size is required"):
        trainer.resolve_train_config(args)
