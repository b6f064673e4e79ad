import hashlib
import json

from transformers import AutoProcessor

from mmrag.serving.models.tiny import TinyLlavaSpec, make_tiny_llava, to_hub_name


def digest(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_same_seed_identical_files_other_seed_other_weights(tmp_path):
    a = make_tiny_llava(tmp_path / "a", TinyLlavaSpec(seed=3))
    b = make_tiny_llava(tmp_path / "b", TinyLlavaSpec(seed=3))
    c = make_tiny_llava(tmp_path / "c", TinyLlavaSpec(seed=4))
    assert digest(a) == digest(b)
    assert digest(a)["model.safetensors"] != digest(c)["model.safetensors"]


def test_checkpoint_layout(tmp_path):
    out = make_tiny_llava(tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["text_config"]["head_dim"] == 64  # vLLM's CPU attention rejects 16
    processor = AutoProcessor.from_pretrained(out)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True,
    )
    assert prompt == "USER: <image>\nhi\nASSISTANT:"
    ids = processor.tokenizer("héllo <image>")["input_ids"]
    assert processor.tokenizer.decode(ids) == "héllo <image>"
    assert ids[-1] == config["image_token_index"]


def test_hub_names():
    assert to_hub_name("model.vision_tower.embeddings.x") == "vision_tower.vision_model.embeddings.x"
    assert to_hub_name("lm_head.weight") == "language_model.lm_head.weight"
