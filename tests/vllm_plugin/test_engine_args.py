"""How the server's config selects the plugin model (no engine started)."""

from __future__ import annotations

import json

import pytest

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.args import aim_enabled, build_engine_args


def _config(**compression) -> MmragConfig:
    return MmragConfig.model_validate({"compression": compression})


def test_llava_checkpoints_get_the_plugin_model_and_the_ratio(tiny_llava_path) -> None:
    args = build_engine_args(_config(aim_keep_ratio=0.25), str(tiny_llava_path))
    assert args.hf_overrides == {"architectures": ["AimLlavaForConditionalGeneration"], "aim_keep_ratio": 0.25}
    default = build_engine_args(_config(), str(tiny_llava_path))
    assert default.hf_overrides["aim_keep_ratio"] == 1.0  # the default deployment: plugin at ratio 1 (stock)


def test_spread_positions_move_the_text_model_onto_per_request_positions(tiny_llava_path) -> None:
    args = build_engine_args(_config(aim_keep_ratio=0.5, aim_positions="spread"), str(tiny_llava_path))
    rope = args.hf_overrides["text_config"]["rope_parameters"]
    head_dim = json.loads((tiny_llava_path / "config.json").read_text())["text_config"]["head_dim"]
    assert sum(rope["mrope_section"]) == head_dim // 2
    assert "text_config" not in build_engine_args(_config(aim_keep_ratio=0.5), str(tiny_llava_path)).hf_overrides


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


def _xrag_config(projector, **retrieval) -> MmragConfig:
    return MmragConfig.model_validate({"retrieval": {"xrag": {"projector": str(projector)}, **retrieval}})


def test_xrag_selects_the_xrag_class_with_its_projector_and_token() -> None:
    from mmrag.serving.models.trained import trained_model_path, trained_projector_path

    args = build_engine_args(_xrag_config(trained_projector_path(), max_top_k=8), str(trained_model_path()))
    assert args.hf_overrides == {
        "architectures": ["XragLlavaForConditionalGeneration"],
        "xrag_projector": str(trained_projector_path().resolve()),
        "xrag_token_index": 512,
        "aim_keep_ratio": 1.0,
    }
    assert args.limit_mm_per_prompt["retrieval"] == 8


@pytest.mark.parametrize(
    ("family", "architecture"),
    [
        ("qwen2.5-vl", "XragQwen2_5_VLForConditionalGeneration"),
        ("onevision", "XragLlavaOnevisionForConditionalGeneration"),
    ],
)
def test_xrag_picks_the_class_of_the_checkpoint_family(tmp_path, family: str, architecture: str) -> None:
    """The architecture follows the checkpoint's; the AIM settings of the family stay (Qwen's layout)."""
    from mmrag.serving.models.tiny_onevision import make_tiny_onevision
    from mmrag.serving.models.tiny_qwen_vl import make_tiny_qwen_vl
    from mmrag.serving.xrag.projector import ProjectorCard, XragProjector, llm_identity, save_projector

    model = (make_tiny_qwen_vl if family == "qwen2.5-vl" else make_tiny_onevision)(tmp_path / family)
    identity = llm_identity(model)
    projector = save_projector(
        XragProjector(384, identity.hidden_size), ProjectorCard("minilm", 384, identity), tmp_path / "p"
    )
    config = MmragConfig.model_validate(
        {"retrieval": {"xrag": {"projector": str(projector)}}, "compression": {"aim_keep_ratio": 0.5}}
    )
    overrides = build_engine_args(config, str(model)).hf_overrides
    assert overrides["architectures"] == [architecture]
    # The first spare row: after the specials (7 on Qwen2.5-VL, 5 on OneVision) and the 256 bytes.
    assert overrides["xrag_token_index"] == (263 if family == "qwen2.5-vl" else 261)
    assert overrides["aim_keep_ratio"] == 0.5
    assert ("aim_positions" in overrides) == (family == "qwen2.5-vl")


def test_xrag_refuses_a_projector_trained_for_another_llm(tiny_llava_path) -> None:
    from mmrag.serving.models.trained import trained_projector_path
    from mmrag.serving.xrag.projector import ProjectorMismatchError

    with pytest.raises(ProjectorMismatchError, match="trained for the LLM"):
        build_engine_args(_xrag_config(trained_projector_path()), str(tiny_llava_path))


def test_xrag_needs_the_placeholder_token(tmp_path) -> None:
    import shutil

    from tokenizers import Tokenizer

    from mmrag.serving.models.trained import trained_model_path, trained_projector_path

    model = shutil.copytree(trained_model_path(), tmp_path / "tiny-mllm")  # same name: the card matches
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<xrag>"]
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert Tokenizer.from_file(str(model / "tokenizer.json")).token_to_id("<xrag>") is None
    with pytest.raises(ValueError, match="train-projector"):
        build_engine_args(_xrag_config(trained_projector_path()), str(model))


def test_lookm_selects_our_scheduler_and_worker_and_turns_off_what_it_cannot_share(tiny_llava_path) -> None:
    from mmrag.serving.vllm_plugin.kv.plan import deployment_method

    config = MmragConfig.model_validate(
        {
            "compression": {"lookm": {"enabled": True, "image_budget": 0.25, "merge": "none"}},
            "engine": {"max_model_len": 4096},
        }
    )
    args = build_engine_args(config, str(tiny_llava_path))
    assert args.scheduler_cls.endswith("KVCompactionScheduler") and args.worker_cls.endswith("KVCompactionWorker")
    assert (args.enable_prefix_caching, args.enable_chunked_prefill) == (False, False)
    assert args.max_num_batched_tokens == 4096  # a whole prompt in the step that compacts it
    settings = deployment_method(args.additional_config)
    # "auto" scores: chunked from Q and K in vLLM, which exposes no attention probabilities.
    assert (settings.name, settings.image_budget, settings.merge, settings.score_from) == ("lookm", 0.25, None, "auto")
    off = build_engine_args(_config(), str(tiny_llava_path))
    assert "mmrag_kv" not in off.additional_config and not str(off.scheduler_cls).endswith("KVCompactionScheduler")


def test_lookm_refuses_prefix_caching(tiny_llava_path) -> None:
    config = MmragConfig.model_validate(
        {"compression": {"lookm": {"enabled": True}}, "engine": {"engine_kwargs": {"enable_prefix_caching": True}}}
    )
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        build_engine_args(config, str(tiny_llava_path))
