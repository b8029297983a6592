from dataclasses import dataclass

import pytest

from electra_fast.config import (IMPLEMENTATIONS, SIZES, ConfigError, apply_overrides, build_config, check_choice,
                                 check_non_negative, check_positive, config_from_dict, load_config, parse_override)


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_yaml_files_load_and_match_named_sizes(size):
    cfg = load_config(f"configs/electra-{size}.yaml")
    assert cfg.size == size
    for section, values in SIZES[size].items():
        for key, value in values.items():
            if f"{section}.{key}" not in ("train.warmup_steps", "train.max_steps"):
                assert getattr(getattr(cfg, section), key) == pytest.approx(value), f"{section}.{key}"


def test_paper_sizes_and_derived_generator():
    small, base, large = (build_config(s) for s in ("small", "base", "large"))
    assert (small.model.hidden_size, small.model.num_layers, small.model.num_heads) == (256, 12, 4)
    assert (small.model.intermediate_size, small.model.embedding_size) == (1024, 128)
    assert small.model.generator_hidden_size == 64 and small.model.generator_num_heads == 1
    assert small.model.generator_intermediate_size == 256 and small.model.generator_num_layers == 12
    assert (small.train.lr, small.train.global_batch_size, small.data.seq_len) == (5e-4, 128, 128)
    assert base.model.generator_hidden_size == 256 and base.model.generator_num_heads == 4
    assert (base.train.lr, base.train.global_batch_size, base.data.seq_len) == (2e-4, 256, 512)
    assert large.model.generator_hidden_size == 256 and large.objective.mask_prob == 0.25
    assert (large.model.num_layers, large.train.global_batch_size) == (24, 2048)
    # reference implementation's bound on predictions per sequence
    assert small.max_predictions_per_seq == 19 and base.max_predictions_per_seq == 79
    assert small.objective.disc_weight == 50.0 and small.objective.mask_token_ratio == 0.85


def test_overrides_are_typed_and_rederive():
    cfg = load_config("configs/electra-small.yaml", ["model.hidden_size=512", "train.lr=1e-4", "model.unpad=false"])
    assert cfg.model.hidden_size == 512 and cfg.model.generator_hidden_size == 128
    assert cfg.train.lr == 1e-4 and cfg.model.unpad is False
    assert isinstance(load_config(size="tiny", overrides=["train.lr=1"]).train.lr, float)


@pytest.mark.parametrize("override, match", [
    ("model.hiden_size=3", "unknown config key 'model.hiden_size'"),
    ("modle.hidden_size=3", "unknown config section 'modle'"),
    ("model.hidden_size=abc", "model.hidden_size expects an integer"),
    ("model.hidden_size=1.5", "model.hidden_size expects an integer"),
    ("train.lr=fast", "train.lr expects a number"),
    ("model.unpad=3", "model.unpad expects true/false"),
    ("train.optimizer=sgd", "train.optimizer"),
    ("model.attention_impl=cuda", "model.attention_impl"),
    ("data.seq_len=1024", "longer than the position table"),
    ("model.num_heads=5", "not divisible"),
    ("hidden_size=3", "section.key"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/electra-small.yaml", [override])


def test_bad_yaml_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_sizee: 3\n")
    with pytest.raises(ConfigError, match="model.hidden_sizee"):
        load_config(path)
    path.write_text("size: huge\n")
    with pytest.raises(ConfigError, match="unknown size 'huge'"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_batch_layout():
    cfg = build_config("small")
    assert cfg.train.batch_layout(1) == (128, 1)
    assert cfg.train.batch_layout(8) == (16, 1)
    cfg.train.micro_batch_size = 8
    assert cfg.train.batch_layout(2) == (8, 8)
    cfg.train.gradient_accumulation_steps = 4
    with pytest.raises(ConfigError, match="inconsistent batch sizes"):
        cfg.train.batch_layout(2)
    cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps = 0, 3
    with pytest.raises(ConfigError, match="not divisible"):
        cfg.train.batch_layout(1)


def test_round_trip_through_dict():
    cfg = load_config("configs/electra-base.yaml", ["train.lr=3e-4"])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_text_fields_keep_the_override_as_typed():
    """YAML would read 2017 as a number; a text field (a path, a column name) wants the text."""
    cfg = load_config(size="tiny", overrides=["data.path=2017", "train.deepspeed_config=0.10"])
    assert cfg.data.path == "2017" and cfg.train.deepspeed_config == "0.10"
    with pytest.raises(ConfigError, match="train.optimizer"):  # still checked against its choices
        load_config(size="tiny", overrides=["train.optimizer=1"])
    with pytest.raises(ConfigError, match="data.seq_len expects an integer"):  # other types as before
        load_config(size="tiny", overrides=["data.seq_len=long"])


def test_overrides_apply_to_any_config_of_dataclass_sections():
    """The parsing and checks fine-tuning's options share: sections are a config's dataclass fields."""
    from dataclasses import dataclass, field

    @dataclass
    class Optim:
        lr: float = 0.1
        name: str = "adamw"

    @dataclass
    class Other:
        steps: int = 1

    @dataclass
    class Custom:
        label: str = "not a section"
        optim: Optim = field(default_factory=Optim)
        other: Other = field(default_factory=Other)

    cfg = Custom()
    apply_overrides(cfg, ["optim.lr=1e-3", "other.steps=4", "optim.name=7"])
    assert (cfg.optim.lr, cfg.other.steps, cfg.optim.name) == (1e-3, 4, "7")
    for override, match in [
        ("optim.beta=1", r"unknown config key 'optim.beta' \(known keys in 'optim': lr, name\)"),
        ("label.x=1", r"unknown config section 'label' in override 'label.x=1' \(sections: optim, other\)"),
        ("other.steps=many", "other.steps expects an integer, got 'many'"),
        ("optim.lr", r"must look like section.key=value"),
    ]:
        with pytest.raises(ConfigError, match=match):
            apply_overrides(Custom(), [override])
    assert parse_override("optim.lr=2", ("optim",)) == ("optim", "lr", 2)
    with pytest.raises(ConfigError, match=r"sections: model, objective, train, data"):
        parse_override("optim.lr=2")  # the pretraining sections by default


def test_range_checks_name_the_key():
    @dataclass
    class Section:
        size: int = 0
        rate: float = -1.0

    with pytest.raises(ConfigError, match=r"train.impl must be one of auto/torch/triton, got 'cuda'"):
        check_choice("train.impl", "cuda", IMPLEMENTATIONS)
    check_choice("train.impl", "triton", IMPLEMENTATIONS)
    with pytest.raises(ConfigError, match=r"s.size must be positive, got 0"):
        check_positive(Section(), "s", ("size",))
    with pytest.raises(ConfigError, match=r"s.rate must be >= 0, got -1.0"):
        check_non_negative(Section(), "s", ("size", "rate"))
    check_non_negative(Section(rate=0.0), "s", ("size", "rate"))
