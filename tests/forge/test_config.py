from pathlib import Path

import pytest

from forge.config import ConfigError, ForgeConfig, load_config


def test_defaults_need_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = load_config()
    assert loaded.source == "defaults"
    assert loaded.config == ForgeConfig()
    assert loaded.config.base.model == "builtin:smollm2-135m-instruct"
    assert loaded.run_dir == tmp_path / "runs" / "default"


def test_unknown_key_names_key_and_closest(tmp_path):
    cfg = tmp_path / "forge.yaml"
    cfg.write_text("train:\n  lrr: 0.001\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr' \(did you mean 'lr'\?\)") as err:
        load_config(cfg)
    assert str(cfg) in str(err.value)


def test_unknown_section(tmp_path):
    cfg = tmp_path / "forge.yaml"
    cfg.write_text("trian:\n  lr: 0.001\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian' \(did you mean 'train'\?\)"):
        load_config(cfg)


def test_bad_value_names_key(tmp_path):
    cfg = tmp_path / "forge.yaml"
    cfg.write_text("data:\n  max_seq_len: -3\n")
    with pytest.raises(ConfigError, match=r"'data\.max_seq_len'"):
        load_config(cfg)


def test_bad_yaml_names_line(tmp_path):
    cfg = tmp_path / "forge.yaml"
    cfg.write_text("train:\n  lr: 1\n  batch_size: [1\n")
    with pytest.raises(ConfigError, match=r"forge\.yaml:\d+: not valid YAML"):
        load_config(cfg)


def test_set_overrides_file_and_parses_numbers(tmp_path):
    cfg = tmp_path / "forge.yaml"
    cfg.write_text("train:\n  lr: 0.001\n  batch_size: 2\n")
    loaded = load_config(cfg, ["train.lr=1e-4", "data.packing=true", "export.quants=[q8_0]"])
    assert loaded.config.train.lr == pytest.approx(1e-4)
    assert loaded.config.train.batch_size == 2
    assert loaded.config.data.packing is True
    assert loaded.config.export.quants == ["q8_0"]


def test_set_unknown_key_is_an_error():
    with pytest.raises(
        ConfigError, match=r"--set train\.rl=1: unknown key 'train\.rl' \(did you mean 'lr'\?\)"
    ):
        load_config(None, ["train.rl=1"])


def test_relative_paths_resolve_against_config_folder(tmp_path, monkeypatch):
    sub = tmp_path / "proj"
    sub.mkdir()
    (sub / "forge.yaml").write_text("data:\n  path: data/train.jsonl\nrun:\n  name: exp1\n")
    monkeypatch.chdir(tmp_path)
    loaded = load_config(Path("proj/forge.yaml"))
    assert loaded.resolve(loaded.config.data.path) == sub / "data" / "train.jsonl"
    assert loaded.run_dir == sub / "runs" / "exp1"


def test_adapter_mode_of_a_full_fine_tune_is_one_line_naming_the_keys(tmp_path):
    cfg = tmp_path / "forge.yaml"
    cfg.write_text("train:\n  method: full\nollama:\n  mode: adapter\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(err.value) == (
        f"{cfg}: 'ollama.mode': adapter needs a LoRA adapter, but train.method is full; use ollama.mode merged"
    )
    assert load_config(cfg, ["train.method=qlora"]).config.ollama.mode == "adapter"
