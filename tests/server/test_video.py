"""``video_url`` chat parts, up to the engine (a fake one): decoding with OpenCV, uniform frame sampling, every
limit checked before the heavy work, and OpenAI-shaped errors naming the part; the server keeps serving after
bad input. The real engine's side (vLLM's video input, AIM on the frames) is tests/e2e/test_video_e2e.py.

The videos are made here with OpenCV's writer (MPEG-4 Part 2 in MP4, MJPEG in AVI), a few dozen pixels wide."""

from __future__ import annotations

import asyncio
import base64
import tempfile
from pathlib import Path

import numpy as np
import pytest

from mmrag.serving.config import LimitsConfig, MmragConfig
from mmrag.serving.errors import InvalidRequestError, OpenAIError, PayloadTooLargeError
from mmrag.serving.openai.protocol import ChatCompletionRequest
from mmrag.serving.pipeline import check_limits
from mmrag.serving.video import VideoPolicy, container_of, decode_video, load_videos, sample_indices
from tests.server.fake_app import app_fixtures

cv2 = pytest.importorskip("cv2")

QWEN = "mmrag-tiny-qwen2.5-vl"


def make_video(frames: int, size: tuple[int, int] = (64, 48), fps: float = 4.0, *, codec: str = "mp4v") -> bytes:
    """A video whose frame i is one flat BGR colour ``(10 i, 100, 200)``: sampled frames read back by colour."""
    suffix = ".mp4" if codec == "mp4v" else ".avi"
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / f"clip{suffix}")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec), fps, size)
        assert writer.isOpened()
        for i in range(frames):
            writer.write(np.full((size[1], size[0], 3), (10 * i, 100, 200), np.uint8))
        writer.release()
        return Path(path).read_bytes()


def data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def policy(**limits) -> VideoPolicy:
    return VideoPolicy.from_limits(LimitsConfig(**limits))


def error_of(call, *args, **kwargs) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        call(*args, **kwargs)
    return caught.value


# --- decoding -------------------------------------------------------------------------------------------------


def test_sample_indices_are_uniform_and_bounded() -> None:
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]
    assert sample_indices(20, 4) == [2, 7, 12, 17]  # the middle of each quarter
    assert sample_indices(1000, 8) == [62, 187, 312, 437, 562, 687, 812, 937]
    assert sample_indices(9, 8) == [0, 1, 2, 3, 5, 6, 7, 8]


def test_frames_are_sampled_uniformly_in_rgb_with_vllms_metadata() -> None:
    frames, metadata = decode_video(make_video(20), policy(max_video_frames=4), param="p")
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    assert metadata["frames_indices"] == [2, 7, 12, 17]
    assert (metadata["fps"], metadata["total_num_frames"], metadata["duration"]) == (4.0, 20, 5.0)
    assert metadata["do_sample_frames"] is False
    assert metadata["declared_pixels"] == 4 * 64 * 48
    # RGB, not OpenCV's BGR: red is the constant 200, blue the frame's own 10 i (MPEG-4 is lossy: a few levels)
    assert np.abs(frames[:, 24, 32, 0].astype(int) - 200).max() <= 6
    assert np.abs(frames[:, 24, 32, 2].astype(int) - [20, 70, 120, 170]).max() <= 6


def test_a_short_video_keeps_every_frame_and_avi_is_read_too() -> None:
    frames, metadata = decode_video(make_video(3, codec="MJPG"), policy(max_video_frames=8), param="p")
    assert frames.shape[0] == 3 and metadata["frames_indices"] == [0, 1, 2]


def test_frames_are_downscaled_at_once() -> None:
    frames, metadata = decode_video(make_video(4, (160, 120)), policy(image_downscale_pixels=40 * 30), param="p")
    assert frames.shape == (4, 30, 40, 3)
    assert metadata["declared_pixels"] == 4 * 160 * 120  # the budget counts the declared size, as for images


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "not a supported video"),
        (b"#EXTM3U\n#EXT-X-TARGETDURATION:1\nhttp://127.0.0.1/x.ts\n", "not a supported video"),  # HLS: never opened
        (b"\x00\x00\x00\x18ftypisom" + bytes(200), "could not be decoded"),
    ],
)
def test_unsupported_or_undecodable_bytes_are_a_400(data: bytes, fragment: str) -> None:
    error = error_of(decode_video, data, policy(), param="messages[0].content[1].video_url.url")
    assert isinstance(error, InvalidRequestError) and error.status_code == 400
    assert error.param == "messages[0].content[1].video_url.url" and fragment in error.message


def test_a_video_with_no_frames_is_a_400() -> None:
    error = error_of(decode_video, make_video(0, codec="MJPG"), policy(), param="p")
    assert (error.status_code, error.message) == (400, "the video has no frames")


def test_byte_frame_and_budget_limits_come_before_decoding() -> None:
    clip = make_video(8, (64, 48))
    assert "larger than 100 bytes" in error_of(decode_video, clip, policy(max_video_bytes=100), param="p").message
    error = error_of(decode_video, clip, policy(max_image_pixels=64 * 47), param="p")
    assert isinstance(error, PayloadTooLargeError) and error.message.startswith("video frame declares 64x48")
    error = error_of(decode_video, clip, policy(max_video_frames=4), param="p", pixels_left=4 * 64 * 48 - 1)
    assert isinstance(error, PayloadTooLargeError) and "4 sampled frames of 64x48" in error.message
    decode_video(clip, policy(max_video_frames=4), param="p", pixels_left=4 * 64 * 48)  # exactly the budget: fine


def test_container_sniffing() -> None:
    assert container_of(make_video(1)) == "mp4"
    assert container_of(make_video(1, codec="MJPG")) == "avi"
    assert container_of(b"\x1a\x45\xdf\xa3" + bytes(8)) == "matroska"
    assert container_of(b"GIF89a" + bytes(8)) is None


def test_data_url_size_is_checked_before_base64_decoding_and_speaks_of_a_video() -> None:
    url = data_url(make_video(4))
    with pytest.raises(PayloadTooLargeError) as caught:
        asyncio.run(load_videos([("v", url)], policy(max_video_bytes=200)))
    assert (caught.value.param, caught.value.message) == ("v", "video larger than 200 bytes")


def test_remote_urls_go_through_the_ssrf_checks() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        asyncio.run(load_videos([("v", "http://127.0.0.1/clip.mp4")], policy()))
    assert "non-public address" in caught.value.message and caught.value.message.startswith("video URL host")
    with pytest.raises(InvalidRequestError, match="scheme 'file' is not allowed"):
        asyncio.run(load_videos([("v", "file:///etc/passwd")], policy()))


def test_request_budget_is_shared_with_the_requests_images() -> None:
    url = data_url(make_video(4))
    with pytest.raises(PayloadTooLargeError):
        asyncio.run(load_videos([("v", url)], policy(max_request_image_pixels=10**6), pixels_used=10**6 - 100))
    (video,) = asyncio.run(load_videos([("v", url)], policy(), pixels_used=10**6))
    assert video[0].shape == (4, 48, 64, 3) and "declared_pixels" not in video[1]


# --- the chat endpoint over a fake engine ---------------------------------------------------------------------


def video_chat(*parts: dict, role: str = "user") -> dict:
    return {"model": QWEN, "messages": [{"role": role, "content": [{"type": "text", "text": "what"}, *parts]}]}


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


served, engine, http, client = app_fixtures(
    {
        "model": {"name": "tiny-qwen2.5-vl"},
        "retrieval": {"default_mode": "none"},
        "limits": {"max_video_frames": 4, "max_video_bytes": 64 * 1024},
    }
)


def assert_error(response, status: int, param: str, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error"), error
    assert fragment in error["message"], error


def test_a_video_reaches_the_engine_as_sampled_frames_behind_a_video_part(http, engine) -> None:
    response = http.post("/v1/chat/completions", json=video_chat(video_part(data_url(make_video(12)))))
    assert response.status_code == 200, response.text
    (seen,) = engine.seen
    assert seen.messages[0]["content"] == [{"type": "text", "text": "what"}, {"type": "video"}]
    ((frames, metadata),) = seen.videos
    assert frames.shape == (4, 48, 64, 3) and metadata["frames_indices"] == [1, 4, 7, 10]


def test_bad_videos_are_400s_naming_the_part_and_the_server_keeps_serving(http, engine) -> None:
    param = "messages[0].content[1].video_url.url"
    bad = http.post("/v1/chat/completions", json=video_chat(video_part(data_url(b"not a video at all"))))
    assert_error(bad, 400, param, "not a supported video")
    big = http.post("/v1/chat/completions", json=video_chat(video_part(data_url(bytes(70_000)))))
    assert_error(big, 413, param, "video larger than 65536 bytes")
    empty = http.post("/v1/chat/completions", json=video_chat(video_part(data_url(make_video(0, codec="MJPG")))))
    assert_error(empty, 400, param, "the video has no frames")
    two = video_chat(video_part(data_url(make_video(2))), video_part(data_url(make_video(2))))
    assert_error(http.post("/v1/chat/completions", json=two), 400, "messages[0].content[2].video_url", "at most 1")
    assistant = video_chat(video_part(data_url(make_video(2))), role="assistant")
    response = http.post("/v1/chat/completions", json=assistant)
    assert response.status_code == 400 and "video_url parts are only accepted in user messages" in response.text
    assert not engine.seen
    ok = http.post("/v1/chat/completions", json=video_chat(video_part(data_url(make_video(2)))))
    assert ok.status_code == 200, ok.text


def test_a_model_without_video_input_refuses_video_parts_by_name() -> None:
    for name in ("smol", "tiny-random"):
        config = MmragConfig.model_validate({"model": {"name": name}})
        body = video_chat(video_part("https://example.com/clip.mp4"))
        request = ChatCompletionRequest.model_validate({**body, "model": config.model.served_name})
        with pytest.raises(InvalidRequestError) as caught:
            check_limits(request, config)
        assert caught.value.param == "messages[0].content[1].video_url"
        assert "does not take video input" in caught.value.message


def test_decoding_stops_at_its_time_limit() -> None:
    slow = VideoPolicy.from_limits(LimitsConfig(video_decode_timeout_s=1e-9))
    error = error_of(decode_video, make_video(4), slow, param="p")
    assert (error.status_code, error.param) == (400, "p") and "to decode" in error.message


def test_the_engine_reads_which_modalities_its_model_takes() -> None:
    """The engine's own refusal (behind the ingress's) asks vLLM's processor; no processor: no video."""
    from types import SimpleNamespace

    from mmrag.serving.engine.prompt import supported_modalities

    def llm(info):
        return SimpleNamespace(renderer=SimpleNamespace(get_mm_processor=lambda: SimpleNamespace(info=info)))

    qwen = SimpleNamespace(get_supported_mm_limits=lambda: {"image": None, "video": None})
    llava = SimpleNamespace(get_supported_mm_limits=lambda: {"image": None})
    assert supported_modalities(llm(qwen)) == {"image", "video"}
    assert supported_modalities(llm(llava)) == {"image"}
    assert supported_modalities(llm(None)) == set()  # a text model: no multimodal processor


def test_a_remote_video_is_fetched_with_its_own_byte_cap() -> None:
    from tests.server.test_media_fetch import Server

    clip = make_video(6)
    server = Server("127.0.0.1", 0, {"/clip.mp4": (200, {}, clip), "/gone.mp4": (404, {}, b"")})
    try:
        base = f"http://127.0.0.1:{server.port}"
        allowed = {"image_url_allowlist": ["127.0.0.1"], "max_video_frames": 4}
        ((frames, metadata),) = asyncio.run(load_videos([("v", f"{base}/clip.mp4")], policy(**allowed)))
        assert frames.shape == (4, 48, 64, 3) and metadata["total_num_frames"] == 6
        tight = policy(**allowed, max_video_bytes=len(clip) - 1, max_image_bytes=10 * len(clip))
        with pytest.raises(PayloadTooLargeError, match=f"video larger than {len(clip) - 1} bytes"):
            asyncio.run(load_videos([("v", f"{base}/clip.mp4")], tight))
        with pytest.raises(InvalidRequestError, match="fetching the video returned HTTP 404"):
            asyncio.run(load_videos([("v", f"{base}/gone.mp4")], policy(**allowed)))
    finally:
        server.close()
