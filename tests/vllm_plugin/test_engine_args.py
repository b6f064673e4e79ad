"""How the server's config selects the plugin model (no engine started)."""

from __future__ import annotations

import json

import pytest

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.vllm_engine import aim_enabled, build_engine_args


def _config(**compression) -> MmragConfig:
    return MmragConfig.model_validate({"compression": compression})


def test_llava_checkpoints_get_the_plugin_model_and_the_ratio(tiny_llava_path) -> None:
    args = build_engine_args(_config(aim_keep_ratio=0.25), str(tiny_llava_path))
    assert args.hf_overrides == {"architectures": ["AimLlavaForConditionalGeneration"], "aim_keep_ratio": 0.25}
    default = build_engine_args(_config(), str(tiny_llava_path))
    assert default.hf_overrides["aim_keep_ratio"] == 1.0  # the default deployment: plugin at ratio 1 (stock)


def test_plugin_off_keeps_the_stock_class(tiny_llava_path) -> None:
    assert not aim_enabled(_config(aim_plugin=False), str(tiny_llava_path))
    assert not build_engine_args(_config(aim_plugin=False), str(tiny_llava_path)).hf_overrides
    with pytest.raises(ValueError, match="aim_plugin"):
        aim_enabled(_config(aim_plugin=False, aim_keep_ratio=0.5), str(tiny_llava_path))


def test_other_architectures_cannot_merge(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"]}))
    assert not aim_enabled(_config(), str(tmp_path))
    with pytest.raises(ValueError, match="AIM supports"):
        aim_enabled(_config(aim_keep_ratio=0.5), str(tmp_path))


def test_register_is_idempotent() -> None:
    from vllm import ModelRegistry

    from mmrag.serving.vllm_plugin import AIM_ARCHITECTURE, register

    register()
    register()
    assert AIM_ARCHITECTURE in ModelRegistry.get_supported_archs()
