import subprocess
import sys
from pathlib import Path

import pytest

from mmrag.serving.cli import COMMANDS, build_parser
from mmrag.serving.config import ModelConfig
from mmrag.serving.models.registry import MANIFEST, model_path, verify


def test_every_command_is_registered_and_parses():
    parser = build_parser()
    args = parser.parse_args(["make-tiny-model", "/tmp/x", "--seed", "2"])
    assert args.seed == 2 and args.out_dir == "/tmp/x"
    assert {"serve", "make-tiny-model", "bench"} <= set(COMMANDS)
    args = parser.parse_args(
        ["train-tiny", "--binding-fraction", "0.1", "--curriculum-hold", "0.25", "--curriculum-fraction", "0.5"]
    )
    assert (args.binding_fraction, args.curriculum_hold, args.curriculum_fraction) == (0.1, 0.25, 0.5)
    assert parser.parse_args(["train-tiny", "--precision", "fp32"]).precision == "fp32"
    from mmrag.serving.cli.train_tiny import config_from_args

    assert config_from_args(parser.parse_args(["train-tiny"])).prompt_loss
    assert not config_from_args(parser.parse_args(["train-tiny", "--no-prompt-loss"])).prompt_loss


def test_train_tiny_family_weights_override_the_defaults_one_by_one(capsys):
    from mmrag.serving.cli.train_tiny import config_from_args
    from mmrag.training.train_tiny import TrainConfig

    parser = build_parser()
    args = parser.parse_args(["train-tiny", "--family-weight", "colour=4", "--family-weight", "needle=0"])
    weights = config_from_args(args).family_weights
    assert weights == {**TrainConfig().family_weights, "colour": 4.0, "needle": 0.0}
    for bad, message in (("color=4", "unknown family 'color'"), ("colour=x", "must be a number"), ("shape=-1", ">= 0")):
        with pytest.raises(SystemExit):
            parser.parse_args(["train-tiny", "--family-weight", bad])
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="family_weights"):  # the config checks too, for callers without the CLI
        TrainConfig(family_weights={"colour": 0})


def test_make_tiny_model_command(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mmrag.serving.cli", "make-tiny-model", str(tmp_path / "m"), "--seed", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "seed 1" in out.stdout
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_a_registered_model_is_prepared_once_into_the_cache_with_a_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("MMRAG_CACHE_DIR", str(tmp_path))
    path = Path(model_path(ModelConfig(name="tiny-random", tiny_seed=5)))
    assert path.parent == tmp_path / "models" and path.name.startswith("tiny-random-")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert model_path(ModelConfig(name="tiny-random", tiny_seed=5)) == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert verify(path) == []
    assert model_path(ModelConfig(name="tiny-random", tiny_seed=6)) != str(path)  # the seed is in the key
    (path / "config.json").write_text("{}")
    assert verify(path) == ["config.json"]  # a damaged copy is told apart
    assert [p.name for p in tmp_path.joinpath("models").iterdir() if not (p / MANIFEST).is_file()] == []


def test_an_unknown_model_name_is_a_config_error_naming_the_registered_ones():
    registered = r"registered: smol, smol-lm, tiny-llava-onevision, tiny-mllm, "
    with pytest.raises(ValueError, match=r"unknown model 'smoll'; " + registered) as caught:
        ModelConfig(name="smoll")
    assert "tiny-qwen2.5-vl, tiny-random" in str(caught.value)
    assert ModelConfig(name="tiny-random").served_name == "mmrag-tiny-llava"
    assert ModelConfig(name="tiny-random", served_name="x").served_name == "x"
    assert ModelConfig(path="/models/my-llava").served_name == "my-llava"


def test_resolve_takes_a_checkpoint_path_and_rejects_a_non_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("MMRAG_CACHE_DIR", str(tmp_path / "cache"))
    generated = model_path(ModelConfig(name="tiny-random"))
    assert model_path(ModelConfig(path=generated)) == generated
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        model_path(ModelConfig(path=str(tmp_path)))


def test_models_list_names_each_models_inputs(capsys):
    from mmrag.serving.cli import main

    assert main(["models", "list"]) == 0
    modalities = {line.split()[0]: line.split()[2] for line in capsys.readouterr().out.splitlines()}
    assert modalities["tiny-qwen2.5-vl"] == "text+image+video"
    assert modalities["smol"] == "text+image" and modalities["smol-lm"] == "text"
