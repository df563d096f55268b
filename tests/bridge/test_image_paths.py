"""Local image paths a hostile message may name, against a real worker with the vision fixture.

Only regular files are read (never the worker's own stdin, a FIFO, a device
or a directory); ``--image-root`` confines them, and refusals tell nothing
about files the worker was not allowed to read. After every refusal the
worker keeps serving.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import WorkerProcess

pytest.importorskip("PIL")
pytest.importorskip("mlx_vlm")

from PIL import Image  # noqa: E402

FIELD = "messages[0].content[1].image_url: "
MAX_IMAGE_BYTES = 100_000
# generous: a refusal is immediate, but the machine may be loaded
PROMPT_S = 20.0


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def image_chat(rid: str, url: str) -> dict[str, Any]:
    parts = [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": url}}]
    return {
        "cmd": "chat",
        "id": rid,
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": 2,
    }


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bridge.demo import vlm as demo_vlm

    return demo_vlm.ensure(tmp_path_factory.mktemp("models") / "tiny-vlm")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two image roots, an image outside them, and links and traps between them."""
    base = tmp_path_factory.mktemp("images")
    root, other_root, outside = base / "root", base / "root2", base / "outside"
    for d in (root, other_root, outside):
        d.mkdir()
    (root / "in.png").write_bytes(png())
    (other_root / "in2.png").write_bytes(png())
    (outside / "secret.png").write_bytes(png())
    (outside / "big.bin").write_bytes(b"\0" * (3 * MAX_IMAGE_BYTES + 12345))
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "inner-link.png").symlink_to(root / "in.png")
    (root / "sub").mkdir()
    fifo = outside / "fifo.png"
    os.mkfifo(fifo)
    (root / "fifo.png").symlink_to(fifo)
    return {
        "root": root,
        "root2": other_root,
        "outside": outside,
        "fifo": fifo,
        "in_fifo": root / "fifo.png",
    }


def start(tiny_vlm: Path, *args: str) -> WorkerProcess:
    worker = WorkerProcess("bridge", ["--max-image-bytes", str(MAX_IMAGE_BYTES), *args])
    loaded = worker.call({"cmd": "load", "id": "setup", "path": str(tiny_vlm)}, timeout=120)
    assert loaded["type"] == "loaded", loaded
    return worker


@pytest.fixture(scope="module")
def open_worker(tiny_vlm: Path) -> Iterator[WorkerProcess]:
    """No --image-root: any absolute path, regular files only."""
    with start(tiny_vlm) as worker:
        yield worker


@pytest.fixture(scope="module")
def rooted_worker(tiny_vlm: Path, files: dict[str, Path]) -> Iterator[WorkerProcess]:
    roots = ["--image-root", str(files["root"]), "--image-root", str(files["root2"])]
    with start(tiny_vlm, *roots) as worker:
        yield worker


def refused(worker: WorkerProcess, url: str, code: str) -> str:
    started = time.monotonic()
    reply = worker.call(image_chat("bad", url), timeout=PROMPT_S)
    assert time.monotonic() - started < PROMPT_S
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert reply["error"].startswith((FIELD, FIELD[:-2] + ".url: ")), reply
    assert_serving(worker)
    return str(reply["error"])


def assert_serving(worker: WorkerProcess, pings: int = 5) -> None:
    for i in range(pings):
        worker.send({"cmd": "ping", "id": f"p{i}"})
    for i in range(pings):
        line = worker.read(timeout=PROMPT_S)
        assert (line["type"], line["id"]) == ("pong", f"p{i}"), line


def answered(worker: WorkerProcess, url: str) -> None:
    lines = worker.request(image_chat("ok", url), timeout=120)
    assert lines[-1]["type"] == "done", lines[-1]


# -- without --image-root -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/dev/stdin", "/proc/self/fd/0", "/dev/zero", "/dev/null"])
def test_the_worker_never_reads_its_stdin_or_a_device(
    open_worker: WorkerProcess, path: str
) -> None:
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist here")
    message = refused(open_worker, path, "bad_image")
    assert "regular file" in message
    assert_serving(open_worker, pings=20)  # none swallowed


def test_a_fifo_is_refused_at_once(open_worker: WorkerProcess, files: dict[str, Path]) -> None:
    for url in (str(files["fifo"]), files["fifo"].as_uri()):
        assert "regular file" in refused(open_worker, url, "bad_image")


def test_a_directory_is_refused(open_worker: WorkerProcess, files: dict[str, Path]) -> None:
    assert "a directory" in refused(open_worker, str(files["root"]), "bad_image")


def test_a_file_that_is_not_an_image_gets_no_size(open_worker: WorkerProcess) -> None:
    size = os.stat("/etc/passwd").st_size
    for url in ("/etc/passwd", "file:///etc/passwd", "file://localhost/etc/passwd"):
        message = refused(open_worker, url, "bad_image")
        assert "not an image" in message
        assert str(size) not in message and "bytes" not in message


def test_a_large_file_gets_no_size(open_worker: WorkerProcess, files: dict[str, Path]) -> None:
    big = files["outside"] / "big.bin"
    message = refused(open_worker, str(big), "image_too_large")
    assert str(big.stat().st_size) not in message and "--max-image-bytes" in message


@pytest.mark.parametrize(
    "url",
    ["file://otherhost/tmp/x.png", "file://example.com/etc/passwd", "file://127.0.0.1/x.png"],
)
def test_a_file_url_with_a_host_is_refused(open_worker: WorkerProcess, url: str) -> None:
    assert "host" in refused(open_worker, url, "bad_image")


@pytest.mark.parametrize(
    "url", ["/tmp/a\x00b.png", "file:///tmp/a%00b.png", "file:///tmp/a\x00.png", "\x00"]
)
def test_a_nul_byte_is_refused_not_internal(open_worker: WorkerProcess, url: str) -> None:
    # A raw NUL is refused by the request parser (invalid_request naming the
    # field); a percent-encoded one only once the URL is decoded (bad_image).
    code = "bad_image" if "%00" in url else "invalid_request"
    assert "NUL" in refused(open_worker, url, code).replace("NUL character", "NUL")


def test_regular_files_still_work(open_worker: WorkerProcess, files: dict[str, Path]) -> None:
    image = files["outside"] / "secret.png"
    for url in (str(image), image.as_uri(), f"file://localhost{image}"):
        answered(open_worker, url)


# -- with --image-root ---------------------------------------------------------------------


def test_images_inside_the_roots_are_read(
    rooted_worker: WorkerProcess, files: dict[str, Path]
) -> None:
    for path in (files["root"] / "in.png", files["root2"] / "in2.png"):
        answered(rooted_worker, str(path))
        answered(rooted_worker, path.as_uri())
    answered(rooted_worker, str(files["root"] / "inner-link.png"))
    answered(rooted_worker, str(files["root"] / "sub" / ".." / "in.png"))


def test_escapes_from_the_roots_are_forbidden(
    rooted_worker: WorkerProcess, files: dict[str, Path]
) -> None:
    root = files["root"]
    escapes = [
        str(root / "escape.png"),  # a symlink that leaves the root
        (root / "escape.png").as_uri(),
        str(root / ".." / "outside" / "secret.png"),  # '..'
        f"{root}/sub/../../outside/secret.png",
        str(files["outside"] / "secret.png"),
        str(root) + "-sibling/x.png",  # a prefix of the root's name is not inside it
        "/etc/passwd",
        "/dev/stdin",
        "/proc/self/fd/0",
    ]
    for url in escapes:
        message = refused(rooted_worker, url, "forbidden")
        assert "--image-root" in message
        assert str(files["outside"]) not in message or str(files["outside"]) in url
    assert str(os.stat("/etc/passwd").st_size) not in refused(
        rooted_worker, "/etc/passwd", "forbidden"
    )


def test_outside_the_roots_nothing_is_told_not_even_existence(
    rooted_worker: WorkerProcess, files: dict[str, Path]
) -> None:
    there = files["outside"] / "secret.png"
    missing = files["outside"] / "missing.png"
    told = refused(rooted_worker, str(there), "forbidden").replace(str(there), "PATH")
    assert refused(rooted_worker, str(missing), "forbidden").replace(str(missing), "PATH") == told
    big = files["outside"] / "big.bin"
    assert str(big.stat().st_size) not in refused(rooted_worker, str(big), "forbidden")


def test_a_fifo_inside_a_root_is_refused(
    rooted_worker: WorkerProcess, files: dict[str, Path]
) -> None:
    # the link is inside the root but leads out, to the FIFO: forbidden, and never opened
    refused(rooted_worker, str(files["in_fifo"]), "forbidden")
    inside = files["root"] / "own.fifo"
    os.mkfifo(inside)
    assert "regular file" in refused(rooted_worker, str(inside), "bad_image")


def test_a_directory_that_does_not_exist_is_a_usage_error(tmp_path: Path) -> None:
    with WorkerProcess("bridge", ["--image-root", str(tmp_path / "nope")]) as worker:
        assert worker.wait(timeout=30) == 2
        assert "--image-root" in worker.stderr_text and "not a directory" in worker.stderr_text
