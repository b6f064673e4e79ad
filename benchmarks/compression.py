"""``mmrag bench compression``: the plugin's compression in vLLM against stock vLLM, measured in one run,
per model family.

Families (``--families``, default all three): ``llava`` (LLaVA-1.5 layout, CLIP tower, fixed tokens per
image), ``qwen2.5-vl`` (dynamic resolution, 2x2 patch merger, M-RoPE) and ``llava-onevision`` (SigLIP,
anyres tiles with a newline per row, a Qwen2 LM), each a random-weight checkpoint generated for the run.

Workload: several fresh noise images per request (new seeds every time: no processor, encoder or prefix
cache hit) and a short question. The full run's LLaVA has 224-pixel images (256 visual tokens each) and an
8-layer, 512-wide text model, so that prefill and attention cost show on a CPU; its Qwen2.5-VL has
448-pixel images (256 tokens each) and its LLaVA-OneVision 112-pixel images (a base view and an 8x8 tile
grid with newlines: 88 tokens each), both with the same 8x512 text model (these two full configurations
have not been run here yet). ``--quick`` uses each family's default tiny checkpoint (2 text layers of
128): LLaVA 56-pixel images (16 tokens), Qwen2.5-VL 112 pixels (4x4 merged patches: 16 tokens),
LLaVA-OneVision 56 pixels (base view 16 + one tile 16 + 4 newlines: 36 tokens), where everything is fixed
overhead. ``visual_tokens_per_image`` in each family's figures is measured: stock's prompt minus the text.

Rows:

- ``stock``: vLLM's own ``LlavaForConditionalGeneration`` (no plugin), its own engine;
- ``aim@1``, ``aim@1/2``, ``aim@1/4``: the plugin's ``AimLlava`` on a second engine, the keep ratio set per
  request (``aim@1`` is the plugin's overhead: the prompt is stock's, so it should come out near 1.0x);
- ``lookm``, ``random``, ..., ``aim@1/4+lookm``: a third engine compacting KV caches, KV methods at their
  default settings chosen per request (:mod:`mmrag.serving.vllm_plugin.kv`), and LOOK-M behind AIM 1/4.
  LLaVA has a row for every registered KV method; Qwen2.5-VL and LLaVA-OneVision have ``lookm`` and
  ``aim@1/4+lookm`` (LOOK-M is the method the issue and the parity tests cover on them).

Ratios ``aim@1/2`` and ``aim@1/4`` keep ``ceil(T x ratio)`` of each image's ``T`` visual tokens on every
family (OneVision: of its packed tokens, newlines included). Stock is vLLM's own class of the family
(``LlavaForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
``LlavaOnevisionForConditionalGeneration``).

Every engine has the same KV pool, ``--kv-budget-tokens`` in blocks of 32, and runs its engine core in
this process, so the scheduler can be read. Families are measured one after the other, each in its own
shuffled rounds: a family's three engines are alive at once and are shut down before the next family's
start. Rows are compared only within their family (each against its own stock), so sharing rounds across
families would buy no ratio, only nine engines' threads contending in one process on a 2-core machine.
Memory was not the reason: on the quick configuration the process peaks at 1.4 GiB RSS with the three
families in turn, each family's engines adding 0.2-0.4 GiB (``memory`` in each family's figures: the
process RSS before its engines, with them started, after the rounds and after their shutdown; the
allocator keeps what was freed, so RSS does not fall after a shutdown).

Method, so that no row gains from its place in the run: within a family, each row is first warmed with
``--warmup`` time-to-first-token and decode requests and one throughput batch; then ``--rounds`` rounds
each visit every row of the family once, in an order shuffled with ``--seed`` (stock is not always first),
and take that row's timed samples of the round. The timed figures are medians across rounds, with min,
max and every sample under ``spread``; ratios against the family's ``stock`` are of the medians. The
scheduler counts (capacity, KV entries) are not timings: they are observed once per row after the rounds,
rows again in a shuffled order.

- ``ttft_ms``: one request at a time with ``max_tokens=1`` (preprocessing, vision tower, merge, prefill,
  and LOOK-M's scoring and compaction);
- ``decode_tokens_per_s``: one request of ``D = --decode-tokens`` forced tokens (``ignore_eos``), the engine
  stepped by hand: one over the median time of its decode steps (steps that ran no prefill). Until
  2026-12-08 it was ``(D - 1) / (t(D tokens) - t(1 token))`` of two whole requests, which at long contexts
  is the difference of two noisy prefills;
- ``batch_decode_tokens_per_s``, ``finish_s``, ``throughput_tokens_per_s``: ``--concurrent`` requests of
  ``D`` tokens added at once, the engine stepped by hand: the requests over the median time of the steps in
  which all of them decoded and none was prefilled; the seconds from the first request added to the last
  one finished (the whole set); generated tokens over those seconds;
- ``requests_in_kv_budget``: observed in the scheduler: ``--capacity-requests`` requests of
  ``--capacity-decode-tokens`` tokens each submitted at once into the pool; the most that were decoding at
  the same time (past their prefill, so each holding its whole prompt's cache, compacted or not; requests
  still in a chunked prefill hold part of it and are not counted);
- ``kv_tokens_per_request``: observed in the same run: the physical cache entries per layer a request
  holds at its last step (prompt entries kept + generated tokens), median over requests.
  ``--capacity-requests 0`` skips these two counts.

Context lengths (``--context-tokens 2048,8192``): the family is measured once per length, each with its own
engines, ``round(tokens / T)`` images per request (``T`` the family's visual tokens per image, at least one),
``max_model_len`` to match and a KV pool of at least ``--concurrent`` whole prompts (so that stock's
throughput batch fits uncompacted); ``--methods`` limits the rows (stock is always measured) and so the
engines started. The sweep is written to ``compression-lengths.json`` (+ png: each timed figure against
the length), leaving the one-length ``compression.json`` alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HELP = "AIM and LOOK-M in vLLM vs stock vLLM: TTFT, decode tokens/s, KV tokens per request, capacity, throughput."

AIM_RATIOS = {"aim@1": 1.0, "aim@1/2": 0.5, "aim@1/4": 0.25}


def kv_rows(methods: tuple[str, ...] | None = None) -> dict[str, tuple[float, Any]]:
    """Row name -> (AIM ratio, KV method): ``methods`` (default every registered KV method) at their default
    settings, served per request by one KV-compaction engine, and LOOK-M behind AIM 1/4."""
    from mmrag.kernels.methods import KV_METHODS, make_kv_method

    rows = {name: (1.0, make_kv_method(name)) for name in (methods or tuple(KV_METHODS))}
    return {**rows, "aim@1/4+lookm": (0.25, make_kv_method("lookm"))}


FAMILIES = ("llava", "qwen2.5-vl", "llava-onevision")


@dataclass(frozen=True)
class Family:
    """One model family's checkpoint and workload: ``visual_tokens_bound`` sizes ``max_model_len`` (the
    figures' ``visual_tokens_per_image`` is measured)."""

    name: str
    spec: Any
    image_hw: tuple[int, int]
    visual_tokens_bound: int
    kv_methods: tuple[str, ...] | None  # None: every registered KV method

    def make(self, out: Path) -> Path:
        if self.name == "llava":
            from mmrag.serving.models.tiny import make_tiny_llava

            return make_tiny_llava(out, self.spec)
        if self.name == "qwen2.5-vl":
            from mmrag.serving.models.tiny_qwen_vl import make_tiny_qwen_vl

            return make_tiny_qwen_vl(out, self.spec)
        from mmrag.serving.models.tiny_onevision import make_tiny_onevision

        return make_tiny_onevision(out, self.spec)

    def text(self, path: Path, images: int) -> str:
        """The prompt: the LLaVA bench's own text, or the checkpoint's chat template with ``images`` images."""
        question = "Compare these pictures in detail."
        if self.name == "llava":
            return "USER: " + "<image>\n" * images + question + "\nASSISTANT:"
        from transformers import AutoProcessor

        content = [*({"type": "image"} for _ in range(images)), {"type": "text", "text": question}]
        processor = AutoProcessor.from_pretrained(path)
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def family(name: str, quick: bool) -> Family:
    """The family's checkpoint spec and image size, quick (default tiny checkpoints) or full."""
    if name == "llava":
        from mmrag.serving.models.tiny import TinyLlavaSpec

        spec = TinyLlavaSpec() if quick else TinyLlavaSpec(image_size=224, text_hidden=512, text_layers=8)
        size = spec.image_size
        return Family(name, spec, (size, size), spec.visual_tokens_per_image, None)
    if name == "qwen2.5-vl":
        from mmrag.serving.models.tiny_qwen_vl import TinyQwenVLSpec

        spec = TinyQwenVLSpec() if quick else TinyQwenVLSpec(text_hidden=512, text_layers=8, max_pixels=448 * 448)
        size = 112 if quick else 448
        return Family(name, spec, (size, size), (size // 28) ** 2, ("lookm",))
    if name == "llava-onevision":
        from mmrag.serving.models.tiny_onevision import TinyOnevisionSpec

        spec = TinyOnevisionSpec() if quick else TinyOnevisionSpec(text_hidden=512, text_layers=8)
        size = 56 if quick else 112
        return Family(name, spec, (size, size), 36 if quick else 88, ("lookm",))
    raise ValueError(f"--families: unknown family {name!r}, known: {', '.join(FAMILIES)}")


def _families(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in FAMILIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown families {unknown}, known: {', '.join(FAMILIES)}")
    return list(dict.fromkeys(names))


def _names(value: str) -> list[str]:
    names = list(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated row names")
    return names


def _positive_ints(value: str) -> list[int]:
    try:
        numbers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return sorted(set(numbers))


def row_groups(fam: Family, methods: list[str] | None) -> dict[str, dict[str, tuple[float | None, Any]]]:
    """Engine kind -> row name -> (AIM ratio, KV method): every row of the family, or ``stock`` and ``methods``;
    an engine none of whose rows is asked for is left out."""
    groups: dict[str, dict[str, tuple[float | None, Any]]] = {
        "stock": {"stock": (None, None)},
        "plugin": {name: (ratio, None) for name, ratio in AIM_RATIOS.items()},
        "kv": kv_rows(fam.kv_methods),
    }
    if methods is None:
        return groups
    known = [name for group in groups.values() for name in group]
    unknown = [name for name in methods if name not in known]
    if unknown:
        raise ValueError(f"--methods: unknown rows {unknown} for {fam.name}, known: {', '.join(known)}")
    wanted = {"stock", *methods}
    chosen = {kind: {n: row for n, row in group.items() if n in wanted} for kind, group in groups.items()}
    return {kind: group for kind, group in chosen.items() if group}


def images_for(tokens: int, fam: Family) -> int:
    """Images per request for a context of ``tokens`` visual tokens (at least one)."""
    return max(1, round(tokens / fam.visual_tokens_bound))


BLOCK_SIZE = 32  # the CPU attention kernel's block sizes are multiples of 32

# Timed per round (median, min, max across rounds); the rest are scheduler counts, observed once per row.
TIMED = ("ttft_ms", "decode_tokens_per_s", "batch_decode_tokens_per_s", "finish_s", "throughput_tokens_per_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--families",
        type=_families,
        default=list(FAMILIES),
        help=f"Comma-separated model families, measured one after the other (default {','.join(FAMILIES)}).",
    )
    parser.add_argument("--images", type=int, default=None, help="Images per request (default 8; quick 4).")
    parser.add_argument(
        "--context-tokens",
        type=_positive_ints,
        default=None,
        help="Comma-separated context lengths in visual tokens (e.g. 2048,8192,16384): a sweep, each length's "
        "images per request its tokens over the family's tokens per image, the pool sized to --concurrent "
        "whole prompts; written to compression-lengths.json unless --out (default: one length, --images).",
    )
    parser.add_argument(
        "--methods",
        type=_names,
        default=None,
        help="Comma-separated rows to measure (stock always; e.g. lookm,aim@1/4+lookm); only their engines start "
        "(default every row of the family).",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="Rounds; each visits every row once (default 8; quick 3)."
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="Warm-up requests of each kind per row (default 3; quick 2)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Shuffles the row order of each round.")
    parser.add_argument(
        "--decode-tokens", type=int, default=None, help="Tokens per decode request (default 32; quick 8)."
    )
    parser.add_argument(
        "--concurrent", type=int, default=None, help="Requests in the throughput run (default 8; quick 4)."
    )
    parser.add_argument(
        "--kv-budget-tokens", type=int, default=None, help="Every engine's KV pool (default 16384; quick 1024)."
    )
    parser.add_argument(
        "--capacity-requests", type=int, default=None, help="Requests in the capacity run (default 48; quick 16)."
    )
    parser.add_argument(
        "--capacity-decode-tokens", type=int, default=None, help="Tokens per capacity request (default 64; quick 16)."
    )


class _Images:
    """Prompts with fresh noise images (one seed counter for every engine) and the same text."""

    def __init__(self, images: int, image_hw: tuple[int, int], text: str):
        self.images, self.image_hw, self.text, self.seed = images, image_hw, text, 0

    def prompt(self, ratio: float | None) -> dict[str, Any]:
        import numpy as np
        from PIL import Image

        batch = [
            Image.fromarray(np.random.default_rng(self.seed + i).integers(0, 256, (*self.image_hw, 3), np.uint8))
            for i in range(self.images)
        ]
        self.seed += self.images
        prompt: dict[str, Any] = {"prompt": self.text, "multi_modal_data": {"image": batch}}
        if ratio is not None:
            prompt["mm_processor_kwargs"] = {"aim_keep_ratio": ratio}
        return prompt


@dataclass
class _Row:
    """One row: the engine serving it, its AIM keep ratio (None on stock) and KV method (None: no compaction)."""

    llm: Any
    ratio: float | None
    kv: Any
    images: _Images

    def timed(self, params, requests: int = 1) -> tuple[float, list[Any]]:
        """Seconds for ``requests`` fresh prompts submitted at once (images made before the clock starts)."""
        prompts = [self.images.prompt(self.ratio) for _ in range(requests)]
        start = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start, outs


def _params(max_tokens: int, kv: Any, **kwargs: Any):
    """Greedy sampling; on the KV-compaction engine the request names its method (``kv``)."""
    from vllm import SamplingParams

    from mmrag.serving.vllm_plugin.kv.plan import request_extra_args

    extra_args = request_extra_args(kv) if kv is not None else None
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra_args, **kwargs)


def _warm(row: _Row, args: argparse.Namespace) -> None:
    """First-call allocations and shapes: ``--warmup`` requests of each timed kind and one throughput batch."""
    for _ in range(args.warmup):
        row.timed(_params(1, row.kv))
        _stepped(row, 1, args.decode_tokens)
    _stepped(row, args.concurrent, args.decode_tokens)


def _stepped(row: _Row, requests: int, decode: int) -> dict[str, Any]:
    """``requests`` fresh prompts of ``decode`` forced tokens added at once and the engine stepped by hand.

    Returns the wall time to finish them all (from the first ``add_request``: input processing, prefills
    and decodes), the tokens generated, and the seconds of every *decode step*: a step before which no
    request was waiting and every running one had its first token, so that it ran no prefill and every
    request decoded in it. A step's batch is how many requests it decoded.
    """
    engine = row.llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    params = _params(decode, row.kv, ignore_eos=True)
    prompts = [row.images.prompt(row.ratio) for _ in range(requests)]  # images made before the clock
    base = row.images.seed  # unique per engine: the seed counter only grows
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"stepped-{base}-{i}", prompt, params)
    steps: dict[int, list[float]] = {}
    generated = 0
    while engine.has_unfinished_requests():
        running = list(scheduler.running)
        decoding_only = not scheduler.waiting and all(request.num_output_tokens > 0 for request in running)
        step_started = time.perf_counter()
        outputs = engine.step()
        if decoding_only and running:
            steps.setdefault(len(running), []).append(time.perf_counter() - step_started)
        generated += sum(len(out.outputs[0].token_ids) for out in outputs if out.finished)
    return {"seconds": time.perf_counter() - started, "generated": generated, "decode_steps": steps}


def _decode_rate(steps: dict[int, list[float]], batch: int) -> float | None:
    """Tokens per second of ``batch`` requests decoding together: ``batch`` over the median decode step."""
    seconds = steps.get(batch)
    return batch / statistics.median(seconds) if seconds else None


def _sample(row: _Row, args: argparse.Namespace) -> dict[str, Any]:
    """One round's timed samples of one row."""
    ttft, (out,) = row.timed(_params(1, row.kv))
    alone = _stepped(row, 1, args.decode_tokens)
    together = _stepped(row, args.concurrent, args.decode_tokens)
    return {
        "prompt_tokens": len(out.prompt_token_ids),
        "ttft_ms": 1000 * ttft,
        "decode_tokens_per_s": _decode_rate(alone["decode_steps"], 1),
        "batch_decode_tokens_per_s": _decode_rate(together["decode_steps"], args.concurrent),
        "finish_s": together["seconds"],
        "throughput_tokens_per_s": together["generated"] / together["seconds"],
    }


def _summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per timed figure the median across rounds (the row's figure) and its spread."""
    from mmrag.benchmarks.common import spread

    row: dict[str, Any] = {"prompt_tokens": samples[-1]["prompt_tokens"], "spread": {}}
    for key in TIMED:
        values = [s[key] for s in samples if s[key] is not None]
        summary = spread(values) or {"median": None, "min": None, "max": None}
        row[key] = summary["median"]
        row["spread"][key] = {**summary, "samples": [s[key] for s in samples]}
    return row


def _observe_capacity(row: _Row, requests: int, decode: int) -> dict[str, Any]:
    """Submit ``requests`` at once; step the engine and read its scheduler after every step."""
    engine = row.llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    offsets = getattr(scheduler, "_offsets", {})  # KVCompactionScheduler: logical - physical length
    params = _params(decode, row.kv, ignore_eos=True)
    for i in range(requests):
        engine.add_request(f"capacity-{row.images.seed}-{i}", row.images.prompt(row.ratio), params)
    peak, seen, known_offsets = 0, {}, {}
    while engine.has_unfinished_requests():
        engine.step()
        # Requests past their prefill: each holds its whole prompt's KV (compacted or not) at once.
        peak = max(peak, sum(request.num_output_tokens > 0 for request in scheduler.running))
        seen.update((request.request_id, request) for request in scheduler.running)
        known_offsets.update(offsets)  # a finished request's offset is dropped with it
    # Finished requests keep their last counts: the prompt and every generated token but the last.
    physical = [request.num_computed_tokens - known_offsets.get(rid, 0) for rid, request in seen.items()]
    return {"requests_in_kv_budget": peak, "kv_tokens_per_request": statistics.median(physical)}


def _engine(path: Path, fam: Family, max_model_len: int, images: int, kind: str, kv_budget_tokens: int):
    """Stock vLLM, the AIM plugin, or the plugin with KV compaction: the server's engine arguments for each."""
    from vllm import LLM

    from mmrag.serving.config import MmragConfig
    from mmrag.serving.engine.args import engine_kwargs

    extra: dict[str, Any] = {"block_size": BLOCK_SIZE, "num_gpu_blocks_override": kv_budget_tokens // BLOCK_SIZE}
    if fam.name != "llava":  # images only: no video budget in the encoder cache and the profile
        extra["limit_mm_per_prompt"] = {"image": images, "video": 0}
    config = MmragConfig.model_validate(
        {
            "engine": {"max_model_len": max_model_len, "engine_kwargs": extra},
            "limits": {"max_images_per_request": images},
            "compression": {"aim_plugin": kind != "stock", "lookm": {"enabled": kind == "kv"}},
        }
    )
    return LLM(**engine_kwargs(config, str(path)))


def _rss_gib() -> float | None:
    """This process's resident memory now (Linux), GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def measure(rows: dict[str, _Row], args: argparse.Namespace) -> dict[str, Any]:
    """Warm every row, then ``--rounds`` rounds over every row in a shuffled order; counts last."""
    from mmrag.benchmarks.common import shuffled_rounds

    started = time.perf_counter()
    for row in rows.values():
        _warm(row, args)
    print(f"warm-up done in {time.perf_counter() - started:.0f} s", flush=True)
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in rows}
    *orders, counting_order = shuffled_rounds(list(rows), args.rounds + 1, args.seed)
    for index, order in enumerate(orders):
        for name in order:
            samples[name].append(_sample(rows[name], args))
        print(f"round {index + 1}/{args.rounds} done at {time.perf_counter() - started:.0f} s: {order}", flush=True)
    figures = {name: _summary(samples[name]) for name in rows}
    for name in counting_order if args.capacity_requests else ():
        figures[name].update(_observe_capacity(rows[name], args.capacity_requests, args.capacity_decode_tokens))
    stock = figures["stock"]
    for row in figures.values():
        row["vs_stock"] = {
            key: row[key] / stock[key] for key in _FIGURES if row.get(key) is not None and stock.get(key)
        }
    return {"rows": {name: figures[name] for name in rows}, "orders": orders}


def measure_family(fam: Family, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One family's three engines (started one after the other, alive together), its rows measured, the
    engines shut down; its figures with the measured visual tokens per image and the process RSS."""
    from transformers import AutoTokenizer

    max_model_len = _max_model_len(args, fam)
    if fam.spec.max_position_embeddings < max_model_len:  # long sweeps: a checkpoint that takes the length
        fam = dataclasses.replace(fam, spec=dataclasses.replace(fam.spec, max_position_embeddings=max_model_len))
    groups = row_groups(fam, args.methods)
    path = fam.make(tmp / fam.name)
    text = fam.text(path, args.images)
    images = _Images(args.images, fam.image_hw, text)
    rss_before = _rss_gib()
    engines: list[Any] = []
    started = time.perf_counter()
    try:
        rows: dict[str, _Row] = {}
        for kind, group in groups.items():
            engines.append(_engine(path, fam, max_model_len, args.images, kind, args.kv_budget_tokens))
            rows.update({name: _Row(engines[-1], ratio, kv, images) for name, (ratio, kv) in group.items()})
        rss_alive = _rss_gib()
        print(f"{fam.name}: engines started in {time.perf_counter() - started:.0f} s, RSS {rss_alive} GiB", flush=True)
        figures = measure(rows, args)
        rss_end = _rss_gib()
    finally:
        for llm in engines:
            llm.llm_engine.engine_core.shutdown()
        engines.clear()
        gc.collect()
    # The text's tokens with one placeholder per image; the engine expands each to the image's tokens.
    placeholders = len(AutoTokenizer.from_pretrained(path)(text)["input_ids"])  # as vLLM encodes it
    visual = (figures["rows"]["stock"]["prompt_tokens"] - placeholders + args.images) / args.images
    figures["visual_tokens_per_image"] = visual
    figures["image_hw"] = list(fam.image_hw)
    figures["spec"] = dataclasses.asdict(fam.spec)
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    figures["memory"] = {
        "rss_gib_before_engines": rss_before,
        "rss_gib_engines_started": rss_alive,
        "rss_gib_after_rounds": rss_end,
        "rss_gib_after_shutdown": _rss_gib(),
    }
    return figures


def _max_model_len(args: argparse.Namespace, fam: Family) -> int:
    """The prompt's images, 256 tokens of text and the longest decode."""
    return 256 + max(args.decode_tokens, args.capacity_decode_tokens) + args.images * fam.visual_tokens_bound


def at_length(args: argparse.Namespace, fam: Family, tokens: int) -> argparse.Namespace:
    """The arguments of one length of a sweep: its images per request, and a pool of at least
    ``--concurrent`` whole prompts (so that every row's throughput batch fits uncompacted, as stock's must)."""
    images = images_for(tokens, fam)
    whole = _max_model_len(argparse.Namespace(**{**vars(args), "images": images}), fam)
    # vLLM holds one block of the pool back (its null block).
    pool = max(args.kv_budget_tokens, (args.concurrent * math.ceil(whole / BLOCK_SIZE) + 1) * BLOCK_SIZE)
    return argparse.Namespace(**{**vars(args), "images": images, "kv_budget_tokens": pool})


def _peak_rss_gib() -> float | None:
    try:
        import resource
    except ImportError:
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from mmrag.benchmarks.common import plot_path, write_result
    from mmrag.kernels.methods import kv_method_as_dict

    _fill_defaults(args)
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    families = [family(name, bool(args.quick)) for name in args.families]
    results: dict[str, Any] = {}
    # In-process engine cores: the capacity run reads the scheduler. One family at a time: its three
    # engines live at once, so that every round can visit every row of the family.
    with _env("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), tempfile.TemporaryDirectory() as tmp:
        for fam in families:
            print(f"family {fam.name}", flush=True)
            if not args.context_tokens:
                results[fam.name] = measure_family(fam, args, Path(tmp))
                continue
            lengths = {}
            for tokens in args.context_tokens:
                at = at_length(args, fam, tokens)
                print(f"{fam.name}: {tokens} tokens, {at.images} images, pool {at.kv_budget_tokens}", flush=True)
                lengths[str(tokens)] = {
                    **measure_family(fam, at, Path(tmp)),
                    "images_per_request": at.images,
                    "kv_budget_tokens": at.kv_budget_tokens,
                }
            results[fam.name] = {"lengths": lengths}
    config = {
        "families": [fam.name for fam in families],
        "images_per_request": args.images,
        "context_tokens": args.context_tokens,
        "methods": args.methods,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "seed": args.seed,
        "decode_tokens": args.decode_tokens,
        "concurrent": args.concurrent,
        "kv_budget_tokens": args.kv_budget_tokens,
        "capacity_requests": args.capacity_requests,
        "capacity_decode_tokens": args.capacity_decode_tokens,
        "block_size": BLOCK_SIZE,
        "kv_methods": {
            fam.name: {name: kv_method_as_dict(kv) for name, (_, kv) in kv_rows(fam.kv_methods).items()}
            for fam in families
        },
        "engine": "vllm offline LLM, enforce_eager, CPU, engine core in process; per family stock, plugin and "
        "plugin+KV compaction (each KV method chosen per request) on separate engines with the same KV pool, "
        "alive at once; families one after the other, each family's engines shut down before the next starts",
        "method": "per family: per row --warmup requests of each kind and one throughput batch; then --rounds "
        "rounds, each visiting every row of the family in an order shuffled with --seed; timed figures are "
        "medians across rounds (spread: min, max, samples), ratios of medians against the family's stock; "
        "scheduler counts observed once per row after the rounds",
        "load_average_at_start": load_at_start,
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "peak_rss_gib": _peak_rss_gib(),
        "wall_s": round(time.perf_counter() - started, 1),
        "quick": bool(args.quick),
    }
    name = "compression-lengths" if args.context_tokens else "compression"
    out = write_result(name, {"families": results}, config, args.out)
    if args.context_tokens:
        _plot_lengths(results, plot_path(out), args)
        for family_name, sweep in results.items():
            for tokens, figures in sweep["lengths"].items():
                print(f"{family_name} at {tokens} tokens ({figures['images_per_request']} images)")
                print(_table(figures["rows"]))
            print(lengths_markdown(sweep, args.concurrent))
    else:
        _plot(results, plot_path(out), args.rounds)
        for family_name, figures in results.items():
            print(f"{family_name} ({figures['visual_tokens_per_image']:g} visual tokens per image)")
            print(_table(figures["rows"]))
    print(f"wrote {out} and {plot_path(out)}")
    return 0


_FIGURES = (
    "ttft_ms",
    "decode_tokens_per_s",
    "batch_decode_tokens_per_s",
    "finish_s",
    "kv_tokens_per_request",
    "requests_in_kv_budget",
    "throughput_tokens_per_s",
)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _fill_defaults(args: argparse.Namespace) -> None:
    quick = bool(args.quick)
    defaults = {
        "images": (8, 4),
        "rounds": (8, 3),
        "warmup": (3, 2),
        "decode_tokens": (32, 8),
        "concurrent": (8, 4),
        "kv_budget_tokens": (16384, 1024),
        "capacity_requests": (48, 16),
        "capacity_decode_tokens": (64, 16),
    }
    for name, (full, short) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)


def _table(rows: dict[str, dict[str, Any]]) -> str:
    keys = ("prompt_tokens", *TIMED, "requests_in_kv_budget")
    lines = [f"{'row':14s} " + " ".join(f"{k:>34s}" for k in keys)]
    for name, row in rows.items():
        cells = []
        for key in keys:
            ratio = row["vs_stock"].get(key) if key != "prompt_tokens" else None
            value = row[key] if row.get(key) is not None else float("nan")
            cell = f"{value:.1f}" + (f" (x{ratio:.2f})" if ratio is not None else "")
            spread = row["spread"].get(key)
            if spread and spread["min"] is not None:
                cell += f" [{spread['min']:.1f}-{spread['max']:.1f}]"
            cells.append(cell)
        lines.append(f"{name:14s} " + " ".join(f"{c:>34s}" for c in cells))
    return "\n".join(lines)


def lengths_markdown(sweep: dict[str, Any], concurrent: int) -> str:
    """One family's sweep as a markdown table (docs/results.md takes it as printed): per length and row the
    medians, the ratio to stock at that length, and the rounds' range of the ratios' basis."""
    columns = {
        "ttft_ms": ("TTFT ms", "{:.0f}"),
        "decode_tokens_per_s": ("decode tok/s, 1 request", "{:.1f}"),
        "batch_decode_tokens_per_s": (f"decode tok/s, {concurrent} together", "{:.1f}"),
        "finish_s": (f"s to finish {concurrent}", "{:.1f}"),
    }
    lines = [
        "| tokens (images) | row | prompt tokens | " + " | ".join(label for label, _ in columns.values()) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for tokens in sorted(sweep["lengths"], key=int):  # the JSON's keys are sorted as text
        figures = sweep["lengths"][tokens]
        for name in sorted(figures["rows"], key=lambda name: name != "stock"):
            row, cells = figures["rows"][name], []
            for key, (_, form) in columns.items():
                if row.get(key) is None:
                    cells.append("no sample")
                    continue
                spread, ratio = row["spread"][key], row["vs_stock"].get(key)
                cell = f"{form.format(row[key])} [{form.format(spread['min'])}-{form.format(spread['max'])}]"
                cells.append(cell + (f" ({ratio:.2f}x)" if name != "stock" and ratio is not None else ""))
            where = f"{tokens} ({figures['images_per_request']})"
            lines.append(f"| {where} | {name} | {row['prompt_tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(families: dict[str, dict[str, Any]], path: Path, rounds: int) -> None:
    """One line of panels per family, one panel per figure; bars annotated with the ratio to the family's stock."""
    from mmrag.benchmarks.common import pyplot

    plt = pyplot()
    keys = _FIGURES
    fig, grid = plt.subplots(len(families), len(keys), figsize=(18, 3.8 * len(families)), squeeze=False)
    colours = [
        "black",
        "tab:gray",
        "tab:purple",
        "tab:blue",
        "tab:orange",
        "tab:red",
        "tab:green",
        "tab:brown",
        "tab:pink",
    ]
    for axes, (family_name, figures) in zip(grid, families.items(), strict=True):
        rows = figures["rows"]
        names = list(rows)
        for ax, key in zip(axes, keys, strict=True):
            heights = [rows[n][key] or 0 for n in names]
            errors = None
            if key in TIMED:  # bars from min to max across rounds
                spreads = [rows[n]["spread"][key] for n in names]
                errors = [
                    [h - (s["min"] if s["min"] is not None else h) for h, s in zip(heights, spreads, strict=True)],
                    [(s["max"] if s["max"] is not None else h) - h for h, s in zip(heights, spreads, strict=True)],
                ]
            colour = [colours[i % len(colours)] for i in range(len(names))]
            ax.bar(names, heights, yerr=errors, capsize=2, color=colour)
            ax.set_title(f"{family_name}: {key.replace('_', ' ')}", fontsize=9)
            ax.tick_params(axis="x", labelsize=7, rotation=45)
            for i, name in enumerate(names):
                ratio = rows[name]["vs_stock"].get(key)
                if ratio is not None:
                    ax.annotate(
                        f"x{ratio:.2f}", (i, 0), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7
                    )
    fig.suptitle(
        f"AIM and LOOK-M in vLLM vs stock vLLM, per family: ratios of medians over {rounds} interleaved rounds "
        "against the family's stock (bars: min-max), counts observed once"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_lengths(families: dict[str, dict[str, Any]], path: Path, args: argparse.Namespace) -> None:
    """One line of panels per family, one panel per timed figure against the context length, a line per
    row with the rounds' min-max as error bars."""
    from mmrag.benchmarks.common import pyplot

    plt = pyplot()
    labels = {
        "ttft_ms": "time to first token, ms",
        "decode_tokens_per_s": "decode tokens/s, 1 request",
        "batch_decode_tokens_per_s": f"decode tokens/s, {args.concurrent} decoding together",
        "finish_s": f"seconds to finish {args.concurrent} requests",
        "throughput_tokens_per_s": f"throughput tokens/s, {args.concurrent} at once",
    }
    fig, grid = plt.subplots(len(families), len(TIMED), figsize=(4 * len(TIMED), 3.6 * len(families)), squeeze=False)
    for axes, (family_name, sweep) in zip(grid, families.items(), strict=True):
        lengths = [int(tokens) for tokens in sweep["lengths"]]
        names = list(next(iter(sweep["lengths"].values()))["rows"])
        for ax, key in zip(axes, TIMED, strict=True):
            for name in names:
                points = [sweep["lengths"][str(t)]["rows"][name] for t in lengths]
                xs = [t for t, row in zip(lengths, points, strict=True) if row[key] is not None]
                ys = [row[key] for row in points if row[key] is not None]
                spreads = [row["spread"][key] for row in points if row[key] is not None]
                low = [y - s["min"] for y, s in zip(ys, spreads, strict=True)]
                high = [s["max"] - y for y, s in zip(ys, spreads, strict=True)]
                ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=2, label=name)
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(t) for t in lengths])
            ax.set_xlabel("visual tokens per request")
            ax.set_title(f"{family_name}: {labels[key]}", fontsize=9)
        axes[0].legend(fontsize=7)
    fig.suptitle(
        f"Stock vLLM vs compression by context length: medians over {args.rounds} interleaved rounds (bars: min-max)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
