"""What the tiny random checkpoints (LLaVA, Qwen2.5-VL, LLaVA-OneVision) write alike.

Each family builds its own tokenizer vocabulary, processor and model; this writes them in the layout vLLM
loads: the processor's files, ``config.json``, ``generation_config.json``, bf16 ``model.safetensors`` and
the spec that built them (``mmrag_tiny.json``). Every file is a pure function of its inputs, so a checkpoint
is a pure function of its seed, and the manifest's checksums (``registry.prepared``) stay valid.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "TinySpec",
    "byte_level_tokenizer",
    "chatml_template",
    "chatml_tokenizer",
    "qwen2_text_config",
    "redraw_weights",
    "save_checkpoint",
    "save_weights",
]

SPEC_FILE = "mmrag_tiny.json"


@dataclass(frozen=True)
class TinySpec:
    """The sizes every tiny family has; each family's spec adds its own (and may change a default). The
    defaults are the fixtures the tests use; the spec is written (keys sorted) as ``mmrag_tiny.json``."""

    seed: int = 0
    patch_size: int = 14
    vision_hidden: int = 128
    vision_layers: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    # Text attention heads of head_dim (vLLM's CPU attention rejects 16), one KV head.
    head_dim: int = 64
    text_kv_heads: int = 1
    # Room above the real tokens (specials and 256 bytes): spare ids for placeholders added later (xRAG).
    vocab_size: int = 320
    max_position_embeddings: int = 4096


def byte_level_tokenizer(special_tokens: Iterable[str], placeholders: Iterable[str] = ()):
    """A ``tokenizers.Tokenizer``: ``special_tokens`` first, then the 256 bytes, and no merges; then
    ``placeholders`` (special tokens in the spare rows above the bytes, e.g. xRAG's ``<xrag>``).

    Every byte is a token, so any text round-trips with no training (the ids follow the order given).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    special = list(special_tokens)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(special)}
    vocab.update({ch: len(special) + i for i, ch in enumerate(alphabet)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(special)
    core.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in placeholders])
    return core


def chatml_template(image: str, video: str) -> str:
    """A chat template of Qwen2's ChatML turns (no default system prompt: prompts stay short), each image part
    written as ``image`` and each video part as ``video`` (literal text for the template)."""
    return (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
        f"{{%- elif part['type'] in ('image', 'image_url') -%}}{{{{ '{image}' }}}}"
        f"{{%- elif part['type'] in ('video', 'video_url') -%}}{{{{ '{video}' }}}}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def chatml_tokenizer(special_tokens: Iterable[str], media_tokens: dict[str, str], template: str, max_length: int):
    """The fast tokenizer of a Qwen2 language model over :func:`byte_level_tokenizer`: ``<|endoftext|>`` pads
    and ``<|im_end|>`` ends a turn, as in Qwen2's ChatML; ``media_tokens`` name the processor's placeholders
    (``image_token``, ``video_token``, ...). xRAG's ``<xrag>`` comes after the bytes (the first spare row), so
    the checkpoint serves a projector with no change to its files
    (:func:`~mmrag.serving.xrag.projector.add_placeholder_token` finds it there)."""
    from transformers import PreTrainedTokenizerFast

    from mmrag.serving.xrag.projector import XRAG_TOKEN

    return PreTrainedTokenizerFast(
        tokenizer_object=byte_level_tokenizer(special_tokens, placeholders=(XRAG_TOKEN,)),
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        extra_special_tokens=media_tokens,
        chat_template=template,
        model_max_length=max_length,
    )


def qwen2_text_config(spec, tokenizer, **fields) -> dict:
    """A Qwen2 language model's config of the spec's ``text_*`` sizes (``head_dim``-sized heads), its special
    ids the tokenizer's (:func:`chatml_tokenizer`); ``fields`` add to or replace what the family sets itself."""
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.text_hidden,
        "intermediate_size": 2 * spec.text_hidden,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_hidden // spec.head_dim,
        "num_key_value_heads": spec.text_kv_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": endoftext,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": endoftext,
        **fields,
    }


def redraw_weights(model, std: float, vectors: tuple[str, ...] = ()) -> None:
    """Redraw every weight matrix, and the 1-D parameters named ending in ``vectors``, from N(0, std).

    transformers' init (std 0.02) leaves a model this small with near-uniform next-token distributions that
    no image or position changes: parity tests could not tell a wrong merge from a right one. Drawn in
    parameter order from torch's global generator (seeded by the caller).
    """
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2 or name.endswith(vectors):
                parameter.normal_(0.0, std)


def save_checkpoint(out_dir: str | Path, processor, model, spec, weight_name: Callable[[str], str] = str) -> Path:
    """Processor, config and bf16 weights (named by ``weight_name``), plus the spec that built them, written
    to ``out_dir`` (rewritten if there); returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out)
    save_weights(model, out, weight_name)
    (out / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2, sort_keys=True) + "\n")
    return out


def save_weights(model, out: Path, weight_name: Callable[[str], str] = str) -> None:
    """Config, generation config and bf16 weights, each under ``weight_name(its transformers name)``;
    a tied LM head is not written (the loader ties it again)."""
    import torch
    from safetensors.torch import save_file

    model.config.architectures = [type(model).__name__]
    model.config.dtype = "bfloat16"  # what vLLM's CPU backend runs; saves a cast (and a warning) per weight
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    # LLaVA's text config holds the flag; Qwen2.5-VL's text config has none (its top-level config does).
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", model.config.tie_word_embeddings)
    state = {
        weight_name(k): v.detach().to(torch.bfloat16).contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k.startswith("lm_head."))
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
