import pytest
from pydantic import ValidationError

from mmrag.serving.config import AutoscalingConfig, DeploymentConfig, EngineConfig, MmragConfig, apply_override


def test_defaults_need_no_file():
    config = MmragConfig.from_file(None)
    assert config.model.path is None
    assert config.server.port == 8000


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  max_model_len: 1024\nserver:\n  port: 9000\n")
    config = MmragConfig.from_file(path, ["server.port=9100", "limits.allow_private_image_urls=true"])
    assert config.engine.max_model_len == 1024
    assert config.server.port == 9100
    assert config.limits.allow_private_image_urls is True


def test_unknown_keys_are_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  max_model_lenn: 1024\n")
    with pytest.raises(ValidationError, match="max_model_lenn"):
        MmragConfig.from_file(path)


def test_engine_kwargs_cannot_shadow_owned_fields():
    with pytest.raises(ValidationError, match="max_model_len"):
        EngineConfig(engine_kwargs={"max_model_len": 10})


def test_override_syntax_errors():
    with pytest.raises(ValueError, match=r"key\.path=value"):
        apply_override({}, "server.port")
    with pytest.raises(ValueError, match="not a mapping"):
        apply_override({"server": 3}, "server.port=1")


def test_autoscaling_bounds_and_serve_options():
    with pytest.raises(ValidationError, match="min_replicas"):
        AutoscalingConfig(min_replicas=3, max_replicas=2)
    fixed = DeploymentConfig(num_replicas=2).serve_options()
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    scaled = DeploymentConfig(autoscaling=AutoscalingConfig(max_replicas=4)).serve_options()
    assert scaled["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in scaled
