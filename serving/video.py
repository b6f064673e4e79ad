"""Loading videos from untrusted URLs (``video_url`` chat parts): fetched as images are, decoded with OpenCV.

- The bytes come through :mod:`.media`'s fetcher: the same schemes, SSRF checks (every address and redirect
  checked, the connection pinned to the checked address), timeouts and bounded decompression, with the
  video's own size cap (``limits.max_video_bytes``), enforced while reading.
- Only MP4/QuickTime, WebM/Matroska and AVI containers are decoded, recognised from their first bytes before
  FFmpeg sees them: FFmpeg's other demuxers include playlists (HLS, concat) that would open further files or
  URLs on their own, past every check here.
- Before any frame is decoded, the container's declared frame size is checked as an image's is (pixels,
  aspect ratio), and the sampled frames' pixels count against the request's image pixel budget
  (``limits.max_request_image_pixels``, shared with its images).
- At most ``limits.max_video_frames`` frames are kept, sampled uniformly over the video (the middle of each of
  that many equal segments); each kept frame is downscaled at once to ``limits.image_downscale_pixels``.
  Decoding runs in a worker thread, never on the event loop.

A decoded video is what vLLM takes as one video item: ``(frames, metadata)``, frames a ``(T, H, W, 3)`` uint8
RGB array and metadata the source's fps and frame count with the indices sampled (the processor derives the
sampled frames' time step from them: Qwen2.5-VL's temporal positions), and ``do_sample_frames`` false (every
frame given is a frame the model sees).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmrag.serving.config import LimitsConfig
from mmrag.serving.errors import InvalidRequestError, OpenAIError, PayloadTooLargeError
from mmrag.serving.media import ImagePolicy, check_image_shape, decode_data_url, downscaled_size, fetch_http, url_scheme
from mmrag.serving.offload import Offload

__all__ = ["VideoPolicy", "container_of", "decode_video", "load_videos", "model_reads_video", "sample_indices"]

# Source frame rate assumed when the container declares none (HF's VideoMetadata assumes the same).
DEFAULT_FPS = 24.0


@dataclass(frozen=True)
class VideoPolicy:
    """The image policy (fetching, per-frame pixels, the request's pixel budget, downscaling) with the
    video's own byte cap in place of the image's, and the frame limit."""

    fetch: ImagePolicy
    max_frames: int
    decode_timeout_s: float = 10.0

    @classmethod
    def from_limits(cls, limits: LimitsConfig) -> VideoPolicy:
        fetch = dataclasses.replace(ImagePolicy.from_limits(limits), max_bytes=limits.max_video_bytes)
        return cls(fetch=fetch, max_frames=limits.max_video_frames, decode_timeout_s=limits.video_decode_timeout_s)


async def load_videos(
    urls: list[tuple[str, str]], policy: VideoPolicy, offload: Offload | None = None, *, pixels_used: int = 0
) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Fetch and decode every ``(param, url)`` of a request: vLLM video items, in order. ``pixels_used``:
    what the request's images took of its pixel budget. Every failure is a 4xx naming its ``param``."""
    run = offload.run if offload is not None else asyncio.to_thread
    blobs = await asyncio.gather(*(_fetch(url, policy, run, param=param) for param, url in urls))
    videos = []
    budget = policy.fetch.max_request_pixels - pixels_used
    for (param, _), data in zip(urls, blobs, strict=True):
        frames, metadata = await run(decode_video, data, policy, param=param, pixels_left=budget)
        budget -= metadata["declared_pixels"]
        videos.append((frames, {k: v for k, v in metadata.items() if k != "declared_pixels"}))
    return videos


async def _fetch(url: str, policy: VideoPolicy, run: Any, *, param: str) -> bytes:
    try:
        scheme = url_scheme(url)
        if scheme not in policy.fetch.schemes:
            allowed = ", ".join(sorted(policy.fetch.schemes))
            raise InvalidRequestError(f"URL scheme {scheme!r} is not allowed (accepted: {allowed})", param=param)
        if scheme == "data":
            return await run(decode_data_url, url, policy.fetch, param=param)
        return await fetch_http(url, policy.fetch, param=param)
    except OpenAIError as exc:
        raise _as_video_error(exc) from exc


def _as_video_error(exc: OpenAIError) -> OpenAIError:
    """The shared fetcher's messages speak of an image ("image larger than N bytes", "could not fetch the
    image"): the same error, about the video."""
    message = exc.message.replace("image", "video")
    return type(exc)(message, param=exc.param, code=exc.code, headers=exc.headers)


def container_of(data: bytes) -> str | None:
    """The container format read from the first bytes (MP4/QuickTime, WebM/Matroska, AVI), None otherwise."""
    if len(data) >= 12 and data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    return None


def sample_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread uniformly over ``total`` frames (every frame when ``total <= count``):
    the middle frame of each of ``count`` equal segments."""
    if total <= count:
        return list(range(total))
    return [min(total - 1, int((i + 0.5) * total / count)) for i in range(count)]


def decode_video(
    data: bytes, policy: VideoPolicy, *, param: str, pixels_left: int | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode the sampled frames of a video's bytes (blocking: run it in a worker thread).

    Returns the ``(T, H, W, 3)`` RGB frames and vLLM's video metadata (plus ``declared_pixels``: what the
    frames took of the request's budget). The container, the declared frame size and the budget
    (``pixels_left``, default the whole request budget) are checked before any frame is decoded.
    """
    import cv2

    if len(data) > policy.fetch.max_bytes:
        raise PayloadTooLargeError(f"video larger than {policy.fetch.max_bytes} bytes", param=param)
    if container_of(data) is None:
        raise InvalidRequestError(
            "the bytes are not a supported video: only MP4/QuickTime, WebM/Matroska and AVI are accepted", param=param
        )
    # OpenCV's FFmpeg backend reads files, not memory: the bytes go to a private temporary file for the decode.
    fd, path = tempfile.mkstemp(prefix="mmrag-video-", suffix=".bin")
    capture = None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
        if not capture.isOpened():
            raise InvalidRequestError(
                "the video could not be decoded (corrupt, or a codec this server lacks)", param=param
            )
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = capture.get(cv2.CAP_PROP_FPS)
        if total < 1 or width < 1 or height < 1:
            raise InvalidRequestError("the video has no frames", param=param)
        _check_frame_shape((width, height), policy, param=param)
        indices = sample_indices(total, policy.max_frames)
        declared = len(indices) * width * height
        budget = policy.fetch.max_request_pixels if pixels_left is None else pixels_left
        if declared > budget:
            raise PayloadTooLargeError(
                f"the video's {len(indices)} sampled frames of {width}x{height} would take the request's images "
                f"over {policy.fetch.max_request_pixels} pixels in all",
                param=param,
            )
        frames, kept = _read_frames(capture, indices, (width, height), policy, param=param)
    finally:
        if capture is not None:
            capture.release()
        os.unlink(path)
    if not frames:
        raise InvalidRequestError("the video has no decodable frames", param=param)
    fps = float(fps) if math.isfinite(fps) and fps > 0 else DEFAULT_FPS
    metadata = {
        "fps": fps,
        "duration": total / fps,
        "total_num_frames": total,
        "frames_indices": kept,
        "video_backend": "opencv",
        "do_sample_frames": False,
        "declared_pixels": declared,
    }
    return np.stack(frames), metadata


def _check_frame_shape(size: tuple[int, int], policy: VideoPolicy, *, param: str) -> None:
    try:
        check_image_shape(size, policy.fetch, param=param)
    except OpenAIError as exc:
        raise type(exc)(exc.message.replace("image", "video frame", 1), param=param) from exc


def _read_frames(
    capture: Any, indices: list[int], size: tuple[int, int], policy: VideoPolicy, *, param: str
) -> tuple[list[np.ndarray], list[int]]:
    """The frames at ``indices`` (RGB, downscaled), reading the stream in order: ``grab`` skips a frame
    without converting it, ``retrieve`` converts the wanted ones. A stream shorter than its header says
    gives the frames it has. Reading stops with a 400 after ``policy.decode_timeout_s``."""
    import cv2

    deadline = time.monotonic() + policy.decode_timeout_s
    target = downscaled_size(size, policy.fetch.downscale_pixels)
    wanted = set(indices)
    frames: list[np.ndarray] = []
    kept: list[int] = []
    for index in range(indices[-1] + 1):
        if time.monotonic() > deadline:
            raise InvalidRequestError(
                f"the video took more than {policy.decode_timeout_s:g} s to decode (limits.video_decode_timeout_s)",
                param=param,
            )
        if not capture.grab():
            break
        if index not in wanted:
            continue
        ok, frame = capture.retrieve()
        if not ok or frame is None:
            break
        if (frame.shape[1], frame.shape[0]) != size:
            raise InvalidRequestError(
                f"the video's frame {index} is {frame.shape[1]}x{frame.shape[0]}, not the {size[0]}x{size[1]} its "
                "header declares",
                param=param,
            )
        if target != size:
            frame = cv2.resize(frame, target, interpolation=cv2.INTER_AREA)
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        kept.append(index)
    return frames, kept


# Checkpoint families whose video input the server renders (chat template, metadata, AIM per frame) and tests:
# config.json's ``model_type``. Registered models by name, as the ingress need not prepare them to know.
VIDEO_MODEL_TYPES = ("qwen2_5_vl",)
VIDEO_MODELS = ("tiny-qwen2.5-vl",)


@functools.lru_cache(maxsize=8)
def model_reads_video(name: str, path: str | None) -> bool:
    """Whether the served model takes ``video_url`` parts: a registered Qwen2.5-VL, or a checkpoint directory
    whose ``config.json`` is Qwen2.5-VL's. A directory this process cannot read is taken to (the engine
    refuses the video if its model has no video input)."""
    if path is None:
        return name in VIDEO_MODELS
    try:
        checkpoint = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return True
    return isinstance(checkpoint, dict) and checkpoint.get("model_type") in VIDEO_MODEL_TYPES
