"""Tier 1 and 3: config parsing and validation, and every shipped config."""

from pathlib import Path

import pytest

from sftune.cli import build_parser
from sftune.commands import config_from_args
from sftune.config import FIELDS, SFTConfig, dump_yaml, load_config, resolve_config
from sftune.errors import SftuneError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_are_the_seed_job():
    cfg = SFTConfig()
    assert (cfg.model, cfg.dataset) == ("gpt2", "stanfordnlp/sst2")
    assert (cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.min_tokens, cfg.epochs) == (32, 5e-5, 0.0, 5, 1)


def test_yaml_scientific_notation_and_null_are_accepted(tmp_path):
    # PyYAML reads `5e-5` (no dot) as a string; it must still be a float
    path = tmp_path / "c.yaml"
    path.write_text("lr: 5e-5\nmax_steps: null\nbatch_size: 8\nsample_prompts: [a, b]\n")
    cfg = load_config(path)
    assert cfg.lr == 5e-5 and isinstance(cfg.lr, float)
    assert cfg.max_steps is None and cfg.batch_size == 8 and cfg.sample_prompts == ["a", "b"]


def test_a_key_set_twice_in_yaml_is_an_error(tmp_path):
    """PyYAML keeps the second value silently; which one was meant is the user's to say (nested mappings too)."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 5e-5\nbatch_size: 8\nlr: 1e-4\n")
    with pytest.raises(SftuneError, match=r"sets 'lr' twice \(lines 1 and 3\); keep one \(--config\)"):
        load_config(path)
    path.write_text("datasets:\n  - dataset: a\n    weight: 1\n    weight: 2\n")
    with pytest.raises(SftuneError, match=r"sets 'weight' twice \(lines 3 and 4\)"):
        load_config(path)
    path.write_text("datasets:\n  - dataset: a\n  - dataset: b\n")  # the same key in two mappings is fine
    assert [d["dataset"] for d in load_config(path).datasets] == ["a", "b"]


def test_unknown_key_is_an_error_with_a_suggestion():
    with pytest.raises(SftuneError) as e:
        resolve_config({"learning_rate": 1e-4, "batch_szie": 4})
    msg = str(e.value)
    assert "unknown key `learning_rate`" in msg
    assert "unknown key `batch_szie`; did you mean `batch_size`?" in msg


def test_wrong_types_are_all_reported_at_once():
    with pytest.raises(SftuneError) as e:
        resolve_config({"batch_size": "eight", "lr": [1], "precision": "fp8", "trust_remote_code": "maybe"})
    msg = str(e.value)
    assert "`batch_size` must be an integer, got 'eight'" in msg
    assert "`lr` must be a number, got [1]" in msg
    assert "`precision` must be one of 'auto' | 'fp32' | 'bf16' | 'fp16', got 'fp8'" in msg
    assert "`trust_remote_code` must be true or false" in msg


def test_bool_is_not_an_int():
    with pytest.raises(SftuneError, match="`batch_size` must be an integer, got True"):
        resolve_config({"batch_size": True})


def test_range_checks_name_the_flag():
    with pytest.raises(SftuneError) as e:
        resolve_config({"batch_size": 0, "val_fraction": 1.5, "max_length": 1})
    msg = str(e.value)
    assert "batch_size = 0: must be at least 1 (set `batch_size` in YAML or --batch-size)" in msg
    assert "val_fraction = 1.5" in msg and "max_length = 1" in msg
    with pytest.raises(SftuneError) as e:
        resolve_config({"split": "train_sft", "val_split": "train_sft", "neftune_alpha": 0})
    msg = str(e.value)
    assert "val_split = 'train_sft': must name another split than the training split ('train_sft')" in msg
    assert "neftune_alpha = 0.0: must be a positive number" in msg and "--neftune-alpha" in msg
    with pytest.raises(SftuneError) as e:
        resolve_config({"warmup_steps": 10, "warmup_ratio": 0.1, "adam_beta2": 1.0, "adam_epsilon": 0})
    msg = str(e.value)
    assert "warmup_ratio = 0.1: is set with warmup_steps 10: set one of them (warmup_steps 0, --warmup-steps 0" in msg
    assert "adam_beta2 = 1.0: must be at least 0 and below 1" in msg and "adam_epsilon = 0.0" in msg
    with pytest.raises(SftuneError, match=r"val_split = '0.1': names a split \(e.g. test\), not a fraction; to hold "
                                          r"out 0.1 of the training split, set val_fraction 0.1 \(--val-fraction\)"):
        resolve_config({"val_split": "0.1"})


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 8\nlr: 1.0e-3\nlog_every: 3\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--batch-size", "4", "--max-steps", "none",
                                      "--no-trust-remote-code", "--sample-prompts", "x", "y"])
    cfg = config_from_args(args)
    assert (cfg.batch_size, cfg.lr, cfg.log_every, cfg.max_steps) == (4, 1e-3, 3, None)
    assert cfg.trust_remote_code is False and cfg.sample_prompts == ["x", "y"]


def test_every_field_has_a_flag_and_help():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    for name, f in FIELDS.items():
        assert "--" + name.replace("_", "-") in flags
        assert f.metadata["help"]


def test_yaml_dump_round_trips(tmp_path):
    cfg = resolve_config({"lr": 1e-3, "sample_prompts": ["hi"], "max_length": 64})
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SftuneError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(SftuneError, match="must be a mapping"):
        load_config(bad)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, SFTConfig)


def test_shipped_configs_exist():
    assert {p.name for p in SHIPPED} >= {"gpt2-sst2.yaml", "quickstart.yaml"}


def test_quickstart_points_at_files_in_the_repo():
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    assert (ROOT / cfg.model / "config.json").is_file()
    assert (ROOT / cfg.dataset / "train.jsonl").is_file() and (ROOT / cfg.dataset / "validation.jsonl").is_file()
    assert cfg.tokenizer == "bundled:gpt2" and cfg.init == "random"


def test_the_1b_llama_example_is_1b_and_fits_its_tokenizer():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = load_config(ROOT / "configs" / "llama-1b.yaml")
    model_config = AutoConfig.from_pretrained(ROOT / cfg.model)
    with torch.device("meta"):  # no memory: only the shapes
        model = AutoModelForCausalLM.from_config(model_config)
    assert 1.0e9 < sum(p.numel() for p in model.parameters()) < 1.3e9
    assert model_config.model_type == "llama" and model_config.vocab_size >= 50257  # GPT-2's tokenizer fits


def test_versions_outside_the_tested_ranges_are_named():
    """What a training run warns about (pip enforces pyproject's ranges; a --no-deps or conda install does not).
    Read against the packages really installed here."""
    from importlib import metadata

    from sftune.runtime import untested_versions

    torch_version = metadata.version("torch")
    assert untested_versions() == []  # this environment is one the suite passes in
    assert untested_versions(["torch>=2.10,<99", "pytest>=99; extra == 'test'", "no-such-package>=1"]) == []
    assert untested_versions(["torch>=99", "numpy>=1.0"]) == [("torch", torch_version, ">=99")]
    from packaging.requirements import Requirement

    torch_range = next(Requirement(r).specifier for r in metadata.requires("sftune") if Requirement(r).name == "torch")
    assert torch_version in torch_range and "2.9.1" not in torch_range  # pyproject's range, as installed


def test_a_config_run_from_another_directory_says_where_its_relative_paths_are(tmp_path, monkeypatch):
    """configs/x.yaml names data/d.jsonl (relative, as the shipped configs do): run from the project it is read; run
    from elsewhere, the config's paths are not found there, and the error says where they are, before anything
    loads (it said "model path not found" after the tokenizer, naming --model)."""
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "data").mkdir()
    (project / "data" / "d.jsonl").write_text('{"text": "a row"}\n')
    config = project / "configs" / "x.yaml"
    config.write_text("dataset: data/d.jsonl\nmodel: gpt2\nchat_template: null\n")

    def resolved(*flags):
        return config_from_args(build_parser().parse_args(["data", "--config", str(config), *flags]))

    monkeypatch.chdir(project)
    assert resolved().dataset == "data/d.jsonl"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SftuneError, match=rf"config {config}: dataset 'data/d.jsonl' is not in the current directory "
                                          rf"\({tmp_path}\) but is in {project}: .* run it from {project}"):
        resolved()
    assert resolved("--dataset", str(project / "data" / "d.jsonl")).model == "gpt2"  # (a flag's path: its own)
    monkeypatch.chdir(project / "configs")
    with pytest.raises(SftuneError, match=f"but is in {project}"):
        resolved()
