"""Vision models through mlx-vlm: the tiny offline qwen2_vl fixture in a real worker.

Images are PNGs made with Pillow, sent as data: URLs, file paths and file://
URLs (and, with --allow-remote-images, from a local HTTP server).
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.engines.vision.images import ImagePolicy, decode_image, read_image_bytes
from bridge.model_dir.kind import ModelKind, model_kind
from protocol.errors import BadImage, ImageTooLarge
from protocol.replies import InfoReply
from protocol.reply_decode import parse_reply
from tests.harness import ROOT, WorkerProcess, text_of, token_ids

pytest.importorskip("PIL")

from PIL import Image  # noqa: E402

WORKER = "bridge"
MAX_IMAGE_BYTES = 100_000
LONG_PROMPT = Path(os.__file__).read_text()[:8000]  # about 3,700 tokens, within the 4,096 context


def png(
    size: tuple[int, int] = (64, 48), color: tuple[int, int, int] | str = (200, 30, 30)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def noise_png(side: int) -> bytes:
    """A PNG that does not compress: side × side random pixels."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def picture(color: str) -> str:
    """A 32×32 picture of one ``color``, as a data URL."""
    return data_url(png((32, 32), color))


def image_chat(
    rid: object, *urls: str, text: str = "What is this?", **extra: Any
) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    request: dict[str, Any] = {
        "cmd": "chat",
        "id": rid,
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": 8,
    }
    return request | extra


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline vision fixture (tests that use it need the vlm extra)."""
    pytest.importorskip("mlx_vlm")
    from bridge.demo import vlm as demo_vlm

    return demo_vlm.ensure(tmp_path_factory.mktemp("models") / "tiny-vlm")


@pytest.fixture(scope="module")
def vlm_worker(tiny_vlm: Path) -> Iterator[WorkerProcess]:
    args = ["--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-images", "2"]
    with WorkerProcess(WORKER, args) as worker:
        loaded = worker.call({"cmd": "load", "path": str(tiny_vlm), "id": "setup"}, timeout=120)
        assert loaded["type"] == "loaded", loaded
        yield worker


@pytest.fixture(scope="module")
def red_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "red image.png"
    path.write_bytes(png())
    return path


# -- load and info ------------------------------------------------------------------


def test_load_says_vision_and_info_has_the_details(
    vlm_worker: WorkerProcess, tiny_vlm: Path
) -> None:
    loaded = vlm_worker.call({"cmd": "load", "id": "l", "path": str(tiny_vlm)}, timeout=120)
    assert loaded["type"] == "loaded" and loaded["vision"] is True
    assert loaded["model_type"] == "qwen2_vl"
    config = json.loads((tiny_vlm / "config.json").read_text())
    assert loaded["layers"] == config["num_hidden_layers"]
    assert loaded["hidden_size"] == config["hidden_size"]
    details = loaded["vision_details"]
    assert details == {
        "image_processor": details["image_processor"],
        "image_token": "<|image_pad|>",
        "image_token_id": config["image_token_id"],
        "vision_model_type": "qwen2_vl",
        "vision_layers": config["vision_config"]["depth"],
        "vision_hidden_size": config["vision_config"]["embed_dim"],
        "patch_size": config["vision_config"]["patch_size"],
        "max_images": 2,
        "max_image_bytes": MAX_IMAGE_BYTES,
        "remote_images": False,
    }
    info = vlm_worker.call({"cmd": "info", "id": "i"})
    assert info["vision"] is True and info["vision_details"] == details


# -- chat with images -----------------------------------------------------------------


def test_chat_with_a_data_url_image_streams_tokens_and_done(vlm_worker: WorkerProcess) -> None:
    lines = vlm_worker.request(image_chat("img", data_url(png())))
    tokens, done = lines[:-1], lines[-1]
    assert len(tokens) == 8 and all(t["type"] == "token" for t in tokens)
    assert done["type"] == "done" and done["finish_reason"] == "length"
    assert done["tokens_generated"] == 8
    assert done["ttft_ms"] > 0 and done["prompt_tps"] > 0 and done["peak_memory_bytes"] > 0
    text_only = vlm_worker.request(
        {"cmd": "chat", "id": "t", "messages": [{"role": "user", "content": "What is this?"}]}
        | {"max_tokens": 1}
    )
    # the image's tokens (vision start and end, and at least one image token) count
    assert done["prompt_tokens"] >= text_only[-1]["prompt_tokens"] + 3


def test_the_same_image_from_a_path_a_file_url_and_a_data_url(
    vlm_worker: WorkerProcess, red_png: Path
) -> None:
    sources = [data_url(red_png.read_bytes()), str(red_png), red_png.as_uri()]
    runs = [vlm_worker.request(image_chat(f"src{i}", url)) for i, url in enumerate(sources)]
    assert all(run[-1]["finish_reason"] == "length" for run in runs)
    assert token_ids(runs[0]) == token_ids(runs[1]) == token_ids(runs[2])
    assert runs[0][-1]["prompt_tokens"] == runs[1][-1]["prompt_tokens"]


def test_two_images_and_legacy_dialect(vlm_worker: WorkerProcess) -> None:
    one = vlm_worker.request(image_chat(None, data_url(png())))
    two = vlm_worker.request(image_chat(None, data_url(png()), data_url(png(color=(0, 0, 255)))))
    assert "id" not in one[-1] and one[-1]["done"] is True
    assert two[-1]["prompt_tokens"] > one[-1]["prompt_tokens"]


def test_streaming_stops_and_sampling_work_as_for_text(vlm_worker: WorkerProcess) -> None:
    greedy = vlm_worker.request(image_chat("g", data_url(png()), max_tokens=12))
    text = text_of(greedy)
    assert text, "the fixture streams text"
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = vlm_worker.request(image_chat("s", data_url(png()), max_tokens=12, stop=[stop]))
    assert stopped[-1]["finish_reason"] == "stop_sequence"
    assert text_of(stopped) == text[: text.index(stop)]
    eos = vlm_worker.request(image_chat("e", data_url(png()), logit_bias={"2": 1000}))
    assert eos[-1]["finish_reason"] == "stop" and eos[-1]["tokens_generated"] == 0
    sampled = vlm_worker.request(
        image_chat("p", data_url(png()), temperature=0.9, seed=3, logprobs=2, max_tokens=3)
    )
    assert all(len(t["top_logprobs"]) == 2 for t in sampled[:-1])


def test_text_only_requests_to_the_vision_model(vlm_worker: WorkerProcess) -> None:
    chat = vlm_worker.request(
        {"cmd": "chat", "id": "c", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    )
    assert chat[-1]["finish_reason"] == "length" and len(chat) == 6
    generate = vlm_worker.request(
        {"cmd": "generate", "id": "g", "prompt": "def f(", "max_tokens": 4}
    )
    assert generate[-1]["tokens_generated"] == 4
    tokens = vlm_worker.call({"cmd": "tokenize", "id": "t", "text": "hello"})["tokens"]
    assert vlm_worker.call({"cmd": "detokenize", "id": "d", "tokens": tokens})["text"] == "hello"


def test_tools_to_a_vision_model_without_a_tool_format_answer_as_text(
    vlm_worker: WorkerProcess,
) -> None:
    """The fixture's template has no tool-call format: as for such a text
    model, the answer is text and a warning says so (test_vision_tools.py
    has one with a format)."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    chat = vlm_worker.request(
        {
            "cmd": "chat",
            "id": "tools",
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": tools,
            "max_tokens": 3,
        }
    )
    assert chat[-1]["finish_reason"] == "length" and "tool_calls" not in chat[-1]
    deadline = time.monotonic() + 5
    while "knows no tool-call format for this model" not in vlm_worker.stderr_text:
        assert time.monotonic() < deadline, vlm_worker.stderr_text
        time.sleep(0.05)


def test_inspect_is_refused_for_a_vision_model(vlm_worker: WorkerProcess) -> None:
    for rid in ("in", None):
        request = {"cmd": "inspect", "prompt": "hello"} | ({"id": rid} if rid else {})
        reply = vlm_worker.call(request)
        assert reply.get("id") == rid and reply["code"] == "invalid_request"
        assert reply["error"].startswith("cmd: inspect supports text models only")


# -- cancel ---------------------------------------------------------------------------


def test_cancel_during_decode(vlm_worker: WorkerProcess) -> None:
    vlm_worker.send(image_chat("long", data_url(png()), max_tokens=100000))
    for _ in range(3):
        assert vlm_worker.read()["type"] == "token"
    sent = time.perf_counter()
    vlm_worker.send({"cmd": "cancel", "id": "long"})
    done = vlm_worker.read_until_terminal("long", timeout=5)[-1]
    assert done["finish_reason"] == "cancelled" and done["tokens_generated"] >= 3
    assert time.perf_counter() - sent < 1.0
    assert vlm_worker.call({"cmd": "ping", "id": "after"})["type"] == "pong"


def test_cancel_during_prefill(vlm_worker: WorkerProcess) -> None:
    vlm_worker.send(image_chat("pf", data_url(png()), text=LONG_PROMPT, max_tokens=5))
    time.sleep(0.3)
    sent = time.perf_counter()
    vlm_worker.send({"cmd": "cancel", "id": "pf"})
    lines = vlm_worker.read_until_terminal("pf")
    elapsed = time.perf_counter() - sent
    assert len(lines) == 1, "no token may come out of a cancelled prefill"
    done = lines[0]
    assert done["finish_reason"] == "cancelled" and done["tokens_generated"] == 0
    assert done["ttft_ms"] is None and done["prompt_tokens"] > 3000
    assert elapsed < 1.0, f"cancel took {elapsed:.3f}s"


# -- image errors ------------------------------------------------------------------------


def test_image_too_large(vlm_worker: WorkerProcess, tmp_path: Path) -> None:
    big = noise_png(200)
    assert len(big) > MAX_IMAGE_BYTES
    path = tmp_path / "big.png"
    path.write_bytes(big)
    for rid, url in (("big-data", data_url(big)), ("big-file", str(path))):
        reply = vlm_worker.call(image_chat(rid, url))
        assert reply["code"] == "image_too_large", reply
        assert reply["error"].startswith("messages[0].content[1].image_url: ")
        assert "--max-image-bytes" in reply["error"]
    three = [data_url(png())] * 3
    reply = vlm_worker.call(image_chat("many", *three))
    assert reply["code"] == "image_too_large" and "--max-images" in reply["error"]
    assert vlm_worker.request(image_chat("ok", data_url(png())))[-1]["type"] == "done"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (data_url(b"not an image at all"), "not an image Pillow can decode"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png,rawbytes", "only base64 data: URLs"),
        (data_url(png()[:60]), "damaged"),
        ("/nonexistent/dir/image.png", "no such file"),
        ("file:///nonexistent/image.png", "no such file"),
        ("relative/image.png", "expected a data: URL"),
        ("ftp://example.com/a.png", "expected a data: URL"),
        ("https://example.com/cat.png", "--allow-remote-images"),
    ],
)
def test_bad_image(vlm_worker: WorkerProcess, url: str, message: str) -> None:
    reply = vlm_worker.call(image_chat("bad", url))
    assert reply["type"] == "error" and reply["code"] == "bad_image", reply
    assert reply["error"].startswith("messages[0].content[1].image_url: ")
    assert message in reply["error"]


def test_image_in_an_assistant_message_is_refused(vlm_worker: WorkerProcess) -> None:
    image = {"type": "image_url", "image_url": {"url": data_url(png())}}
    reply = vlm_worker.call(
        {
            "cmd": "chat",
            "id": "asst",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [image]},
                {"role": "user", "content": "and?"},
            ],
        }
    )
    assert reply["code"] == "invalid_request"
    assert reply["error"].startswith("messages[1].content[0].image_url: ")


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path != "/red.png":
            self.send_error(404)
            return
        body = png()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_remote_images_with_allow_remote_images(tiny_vlm: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with WorkerProcess(WORKER, ["--allow-remote-images"]) as worker:
            loaded = worker.call({"cmd": "load", "id": "l", "path": str(tiny_vlm)}, timeout=120)
            assert loaded["vision_details"]["remote_images"] is True
            remote = worker.request(image_chat("r", f"{base}/red.png"))
            local = worker.request(image_chat("d", data_url(png())))
            assert remote[-1]["finish_reason"] == "length"
            assert token_ids(remote) == token_ids(local)
            missing = worker.call(image_chat("m", f"{base}/missing.png"))
            assert missing["code"] == "bad_image" and "could not fetch" in missing["error"]
    finally:
        server.shutdown()
        server.server_close()


# -- text models, model switching, and no mlx-vlm -------------------------------------------


def test_text_model_given_an_image_is_vision_not_supported(
    tiny_model: Path, tiny_vlm: Path
) -> None:
    with WorkerProcess(WORKER) as worker:
        for path in (tiny_model, tiny_vlm, tiny_model):
            loaded = worker.call({"cmd": "load", "id": "l", "path": str(path)}, timeout=120)
            assert loaded["vision"] is (path == tiny_vlm)
            assert ("vision_details" in loaded) is (path == tiny_vlm)
            reply = worker.request(image_chat("c", data_url(png())))
            if path == tiny_vlm:
                assert reply[-1]["type"] == "done"
            else:
                assert reply[-1]["code"] == "vision_not_supported"
        assert worker.call({"cmd": "info", "id": "i"})["model_type"] == "qwen3"
        # the engine thread ran both engines; it must still exit cleanly
        assert worker.call({"cmd": "quit", "id": "q"})["type"] == "bye"
        assert worker.wait() == 0


def test_switching_kinds_checks_memory_before_unloading(tiny_model: Path, tiny_vlm: Path) -> None:
    """A vision model that does not fit is refused while the text model stays loaded."""

    def size(directory: Path) -> int:
        return sum(f.stat().st_size for f in directory.glob("*.safetensors"))

    # the gate also counts the KV cache of 4,096 tokens (max_position_embeddings), the same
    # for both: 2 layers × 2 KV heads × head dim 16 × 2 (K and V) × 4 bytes per token
    kv = 2 * 2 * 16 * 2 * 4 * 4096
    text, vision = size(tiny_model) + kv, size(tiny_vlm) + kv
    assert text < vision
    budget = int((text + vision) / 2 / 0.9)  # fits the text model, not the vision model
    with WorkerProcess(WORKER, ["--memory-budget", str(budget)]) as worker:
        assert worker.call({"cmd": "load", "id": 1, "path": str(tiny_model)})["type"] == "loaded"
        refused = worker.call({"cmd": "load", "id": 2, "path": str(tiny_vlm)}, timeout=120)
        assert refused["code"] == "out_of_memory", refused
        info = worker.call({"cmd": "info", "id": 3})
        assert info["model_type"] == "qwen3" and info["path"] == str(tiny_model)


def test_without_mlx_vlm_a_vision_model_is_load_failed(tiny_model: Path, tmp_path: Path) -> None:
    stub = tmp_path / "no-mlx-vlm"
    stub.mkdir()
    (stub / "mlx_vlm.py").write_text("raise ImportError(\"No module named 'mlx_vlm'\")\n")
    model = tmp_path / "vision-model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"model_type": "llava", "vision_config": {"hidden_size": 8}})
    )
    (model / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")  # no tensors
    paths = [str(stub), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, paths))}
    with WorkerProcess(WORKER, env=env) as worker:
        loaded = worker.call({"cmd": "load", "id": "t", "path": str(tiny_model)})
        assert loaded["type"] == "loaded"
        reply = worker.call({"cmd": "load", "id": "v", "path": str(model)})
        assert reply["code"] == "load_failed"
        assert "mlx-bridge[vlm]" in reply["error"]
        # the text model stays loaded
        assert worker.call({"cmd": "info", "id": "i"})["model_type"] == "qwen3"


# -- the pieces, in process -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        ({"model_type": "qwen2_vl", "vision_config": {"depth": 2}}, ModelKind.VISION),
        ({"model_type": "llava", "mm_vision_tower": "openai/clip"}, ModelKind.VISION),
        ({"model_type": "qwen3"}, ModelKind.TEXT),
        ({"model_type": "gemma3_text", "vision_config": None}, ModelKind.TEXT),
        ({"model_type": "x", "vision_config": {}}, ModelKind.TEXT),
    ],
)
def test_model_kind(config: dict[str, object], kind: ModelKind) -> None:
    assert model_kind(config) is kind


def test_images_decode_in_memory_and_check_caps(tmp_path: Path) -> None:
    policy = ImagePolicy(max_bytes=1000, max_images=1)
    data = read_image_bytes(data_url(png()), policy, field="f", request_id=None)
    image = decode_image(data, field="f", request_id=None)
    assert image.size == (64, 48) and image.mode == "RGB"
    gray = io.BytesIO()
    Image.new("L", (3, 2), 128).save(gray, "PNG")
    assert decode_image(gray.getvalue(), field="f", request_id=None).mode == "RGB"
    with pytest.raises(ImageTooLarge):
        read_image_bytes(data_url(noise_png(40)), policy, field="f", request_id=None)
    with pytest.raises(BadImage, match="absolute"):
        read_image_bytes("file:relative.png", policy, field="f", request_id=None)


def test_vision_details_round_trip_through_the_reply_decoder(vlm_worker: WorkerProcess) -> None:
    info = vlm_worker.call({"cmd": "info", "id": "rt"})
    reply = parse_reply(info)
    assert isinstance(reply, InfoReply) and reply.model.vision_details is not None
    assert reply.model.vision_details.image_token == "<|image_pad|>"
    assert reply.to_wire() == info
