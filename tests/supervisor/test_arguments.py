"""Every bad argument of every public method raises ``InvalidArgument``, before anything is sent.

The worker here is a tripwire: it answers ``hello`` and ``ping`` and exits
with status 3 on any other line. So a bad call that raised
``InvalidArgument`` and left the worker answering ``ping`` sent nothing.
Each case names the argument its message must mention.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from protocol.errors import InvalidRequest
from supervisor import AsyncWorker, InvalidArgument, RequestError, RestartPolicy, Worker
from supervisor.settings import Settings
from tests.supervisor.conftest import ENV, ROOT, python_worker

pytestmark = pytest.mark.timeout(60)

TRIPWIRE = textwrap.dedent(
    """
    import json, sys

    for line in sys.stdin:
        req = json.loads(line)
        cmd, rid = req["cmd"], req.get("id")
        if cmd == "hello":
            reply = {"type": "hello", "id": rid, "protocol_version": 1, "versions": {},
                     "commands": [], "sampling_options": [], "limits": {}, "pid": 0}
        elif cmd == "ping":
            reply = {"type": "pong", "id": rid}
        else:
            sys.stderr.write("tripwire: got " + line)
            sys.exit(3)
        sys.stdout.write(json.dumps(reply) + "\\n")
        sys.stdout.flush()
    """
)

NAN, INF = math.nan, math.inf
HUGE = 10**20  # over 64 bits: orjson cannot write it
NUL = "a\0b"


def _deep(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


USER = {"role": "user", "content": "hi"}

# (method, positional args, keyword args, the name the message must mention)
Case = tuple[str, tuple[Any, ...], dict[str, Any], str]

CASES: list[Case] = [
    # load
    *[("load", (v,), {}, "path") for v in (5, None, b"dir", "", NUL, object(), NAN)],
    *[("load", ("m",), {"adapter_path": v}, "adapter_path") for v in (5, "", NUL, b"a")],
    *[
        ("load", ("m",), {"context_len": v}, "context_len")
        for v in (HUGE, 2**64, -1, 0, NAN, INF, "4096", True, 1.5, [1])
    ],
    *[("load", ("m",), {"trust_remote_code": v}, "trust_remote_code") for v in ("yes", 1, [0])],
    *[("load", ("m",), {"force": v}, "force") for v in ("yes", 1)],
    # generate: the prompt, every sampling option, cache_key, extra
    *[("generate", (v,), {}, "prompt") for v in (5, None, b"hi", ["hi"])],
    *[
        ("generate", ("a",), {"max_tokens": v}, "max_tokens")
        for v in (0, -1, HUGE, -(2**63) - 1, NAN, INF, "5", True, 1.5, [5])
    ],
    *[
        ("generate", ("a",), {"temperature": v}, "temperature")
        for v in (-1, NAN, INF, -INF, "0.5", True, [0.5])
    ],
    *[("generate", ("a",), {"top_p": v}, "top_p") for v in (2, -0.1, NAN, "1")],
    *[("generate", ("a",), {"top_k": v}, "top_k") for v in (-1, HUGE, 1.5, "4")],
    *[("generate", ("a",), {"min_p": v}, "min_p") for v in (2, -1, NAN)],
    *[("generate", ("a",), {"repetition_penalty": v}, "repetition_penalty") for v in (-1, NAN)],
    *[
        ("generate", ("a",), {"repetition_context_size": v}, "repetition_context_size")
        for v in (0, -5, HUGE, NAN, "20")
    ],
    *[
        ("generate", ("a",), {"logit_bias": v}, "logit_bias")
        for v in ({-1: 1.0}, {"a": 1.0}, {1: NAN}, {1: "x"}, {True: 1.0}, {1.5: 1.0}, 5, [1])
    ],
    *[("generate", ("a",), {"seed": v}, "seed") for v in (-1, 2**64, NAN, "1")],
    *[("generate", ("a",), {"stop": v}, "stop") for v in (5, [5], [""], {"a"}, [NAN])],
    *[("generate", ("a",), {"logprobs": v}, "logprobs") for v in (-1, 21, 1.5, HUGE)],
    ("generate", ("a",), {"max_token": 4}, "max_token"),  # a typo is refused
    *[("generate", ("a",), {"cache_key": v}, "cache_key") for v in ("", 5)],
    *[
        ("generate", ("a",), {"extra": v}, name)
        for v, name in (
            (5, "extra"),
            ({"x": NAN}, "x"),
            ({"x": HUGE}, "x"),
            ({"x": {"y": INF}}, "x.y"),
            ({1: 2}, "keys"),
            ({"x": object()}, "x"),
            ({"x": {1, 2}}, "x"),
            ({"x": _deep(300)}, "nested deeper"),
            ({"max_tokens": -1}, "max_tokens"),  # extra is checked like the rest
        )
    ],
    # chat
    *[
        ("chat", (v,), {}, name)
        for v, name in (
            ("hi", "messages"),
            (5, "messages"),
            ([], "messages"),
            (["hi"], "messages[0]"),
            ([{"content": "x"}], "messages[0].role"),
            ([{"role": 5, "content": "x"}], "messages[0].role"),
            ([{"role": "user", "content": 5}], "messages[0].content"),
            ([{"role": "user", "content": NAN}], "messages[0].content"),
            ([{"role": "user", "content": [{"type": "video"}]}], "messages[0].content[0].type"),
            ([{"role": "user", "content": "x", "name": HUGE}], "messages[0].name"),
        )
    ],
    *[("chat", ([USER],), {"max_tokens": v}, "max_tokens") for v in (0, HUGE, NAN)],
    *[("chat", ([USER],), {"tools": v}, "tools") for v in (5, [5], [{"type": "x"}])],
    *[
        ("chat", ([USER],), {"chat_template_kwargs": v}, "chat_template_kwargs")
        for v in (5, {"a": NAN}, "x")
    ],
    # tokenize, detokenize, inspect
    *[("tokenize", (v,), {}, "text") for v in (5, None, b"x")],
    *[("tokenize", ("a",), {"add_special_tokens": v}, "add_special_tokens") for v in ("no", 0)],
    *[
        ("detokenize", (v,), {}, "tokens")
        for v in (5, "abc", b"ab", {1: 2}, [5.0], [True], [-1], [HUGE], [NAN], [None], ["1"])
    ],
    *[("inspect", (v,), {}, "prompt") for v in (5, None)],
    *[("inspect", ("a",), {"directory": v}, "directory") for v in (5, "", NUL, b"d")],
]
# ``timeout`` of every method that takes one.
TIMEOUT_ARGS: dict[str, tuple[Any, ...]] = {
    "load": ("m",),
    "unload": (),
    "generate": ("a",),
    "chat": ([USER],),
    "info": (),
    "tokenize": ("a",),
    "detokenize": ([1],),
    "inspect": ("a",),
    "ping": (),
}
CASES += [
    (method, args, {"timeout": v}, "timeout")
    for method, args in TIMEOUT_ARGS.items()
    for v in (-1, NAN, INF, 1e300, "5", True, [1])
]


def _id(case: Case) -> str:
    method, args, kwargs, name = case
    shown = [*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())]
    return f"{method}({', '.join(shown)})"[:60]


def _wrong(case: Case, error: BaseException | None) -> str | None:
    """None if ``error`` is the InvalidArgument the case expects, else what is wrong."""
    name = case[3]
    if not isinstance(error, InvalidArgument):
        return f"{_id(case)}: raised {error!r}"
    if name not in str(error):
        return f"{_id(case)}: {name!r} not in {str(error)!r}"
    assert isinstance(error, RequestError) and isinstance(error, ValueError)
    assert error.code == "invalid_request" and isinstance(error.error, InvalidRequest)
    return None


def test_every_bad_argument_of_worker_raises_invalid_argument_and_sends_nothing() -> None:
    wrong = []
    with python_worker(TRIPWIRE) as w:
        for case in CASES:
            method, args, kwargs, _ = case
            try:
                getattr(w, method)(*args, **kwargs)
                error = None
            except Exception as exc:
                error = exc
            if (problem := _wrong(case, error)) is not None:
                wrong.append(problem)
            if w.returncode is not None:
                break
        assert not wrong, "\n".join(wrong)
        w.ping()  # the tripwire never fired: nothing was sent
        assert w.returncode is None


def test_every_bad_argument_of_async_worker_raises_invalid_argument_and_sends_nothing() -> None:
    async def main() -> None:
        options: dict[str, Any] = {"env": ENV, "cwd": ROOT, "start_timeout": 10.0}
        async with AsyncWorker([sys.executable, "-c", TRIPWIRE], **options) as w:
            wrong = []
            for case in CASES:
                method, args, kwargs, _ = case
                try:
                    result = getattr(w, method)(*args, **kwargs)
                    if asyncio.iscoroutine(result):
                        await result
                    error = None
                except Exception as exc:
                    error = exc
                if (problem := _wrong(case, error)) is not None:
                    wrong.append(problem)
                if w.returncode is not None:
                    break
            assert not wrong, "\n".join(wrong)
            await w.ping()
            assert w.returncode is None

    asyncio.run(asyncio.wait_for(main(), 50))


@pytest.mark.parametrize("case", [CASES[0], CASES[20], CASES[-1]], ids=_id)
def test_a_bad_argument_fails_the_same_way_in_both_twins(case: Case) -> None:
    """The message is the same text in ``Worker`` and ``AsyncWorker``."""
    method, args, kwargs, _ = case
    messages = []
    with python_worker(TRIPWIRE) as w:
        with pytest.raises(InvalidArgument) as caught:
            getattr(w, method)(*args, **kwargs)
        messages.append(str(caught.value))

    async def main() -> None:
        options: dict[str, Any] = {"env": ENV, "cwd": ROOT}
        async with AsyncWorker([sys.executable, "-c", TRIPWIRE], **options) as aw:
            with pytest.raises(InvalidArgument) as caught:
                result = getattr(aw, method)(*args, **kwargs)
                if asyncio.iscoroutine(result):
                    await result
            messages.append(str(caught.value))

    asyncio.run(main())
    assert messages[0] == messages[1]


def test_a_stream_wait_with_a_bad_timeout() -> None:
    echo = [sys.executable, "-m", "mock_worker"]
    with Worker(echo, model="m", env=ENV, cwd=ROOT) as w, w.generate("a b", max_tokens=2) as s:
        bad: Any
        for bad in (NAN, -1, "1", INF):
            with pytest.raises(InvalidArgument, match="timeout"):
                s.wait(bad)
        assert s.wait(10) and s.text() == "a b"


def test_the_values_that_are_fine_still_pass() -> None:
    """Integral floats, numpy-like integers and path objects are accepted."""

    class Index:
        def __init__(self, n: int) -> None:
            self.n = n

        def __index__(self) -> int:
            return self.n

    echo = [sys.executable, "-m", "mock_worker"]
    with Worker(echo, env=ENV, cwd=ROOT, request_timeout=10) as w:
        w.load(Path("some/model"), context_len=4096.0)  # type: ignore[arg-type]
        assert w.detokenize((Index(1), 2)) is not None  # type: ignore[arg-type]
        stream = w.generate("a b c", max_tokens=2, stop=("zz",), logit_bias={3: 1}, timeout=5)
        assert stream.text() == "a b"


# -- constructors: nothing is spawned ------------------------------------------------------


CONSTRUCTOR_CASES: list[tuple[dict[str, Any], str]] = [
    ({"command": "python -m bridge"}, "command"),
    ({"command": 5}, "command"),
    ({"command": []}, "command"),
    ({"command": ["python", 5]}, "command[1]"),
    ({"command": ["python", NUL]}, "command[1]"),
    ({"model": 5}, "path"),
    ({"model": NUL}, "path"),
    ({"env": {"A": 5}}, "env"),
    ({"env": {"A=B": "1"}}, "env"),
    ({"env": {"A": NUL}}, "env"),
    ({"env": 5}, "env"),
    ({"cwd": NUL}, "cwd"),
    ({"cwd": 5}, "cwd"),
    ({"inherit_env": "yes"}, "inherit_env"),
    *[({"start_timeout": v}, "start_timeout") for v in (-1, NAN, INF, None, "1", True)],
    *[({"request_timeout": v}, "request_timeout") for v in (-1, NAN, INF, 1e300, "1")],
    *[({name: -1}, name) for name in ("cancel_grace", "quit_timeout", "term_timeout")],
    ({"kill_timeout": NAN}, "kill_timeout"),
    ({"restart": 3}, "restart"),
    *[({"memory_limit_bytes": v}, "memory_limit_bytes") for v in (0, -1, 1.5, "1G", True)],
    *[({"memory_poll_interval": v}, "memory_poll_interval") for v in (0, -1, NAN, "1")],
    *[({"max_line_bytes": v}, "max_line_bytes") for v in (0, 1.5, None)],
    *[({"model_root": v}, "model_root") for v in (5, "", NUL, b"root")],
    *[({"image_roots": v}, "image_roots") for v in (5, [5], [""], [NUL])],
    *[({"trust_remote_code": v}, "trust_remote_code") for v in ("yes", 1, None)],
]


@pytest.mark.parametrize(("kwargs", "name"), CONSTRUCTOR_CASES, ids=lambda v: repr(v)[:40])
def test_a_bad_constructor_argument_spawns_nothing(
    kwargs: dict[str, Any], name: str, tmp_path: Path
) -> None:
    spawned = tmp_path / "spawned"
    sentinel = [sys.executable, "-c", f"open({str(spawned)!r}, 'w')"]
    options: dict[str, Any] = {"command": sentinel, "start_timeout": 5.0} | kwargs
    for make in (Worker, AsyncWorker):
        with pytest.raises(InvalidArgument) as caught:
            make(**options)
        assert name in str(caught.value), caught.value
        assert isinstance(caught.value, ValueError)
    assert not spawned.exists()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"max_restarts": -1}, "max_restarts"), ({"window_s": 0}, "window_s")]
    + [({"window_s": v}, "window_s") for v in (NAN, INF, "60")]
    + [({"max_restarts": v}, "max_restarts") for v in (1.5, "3", None)],
)
def test_a_bad_restart_policy(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(InvalidArgument, match=name):
        RestartPolicy(**kwargs)


# -- the worker flags of the settings ---------------------------------------------------------


def test_settings_append_the_worker_flags_to_the_command() -> None:
    plain = Settings(command=("w",))
    assert plain.argv == ("w",)
    flagged = Settings(
        command=("w", "--x"),
        model_root="/models",
        image_roots=("/img/a", "-odd"),
        trust_remote_code=True,
    )
    assert flagged.argv == (
        "w",
        "--x",
        "--model-root=/models",
        "--image-root=/img/a",
        "--image-root=-odd",
        "--trust-remote-code",
    )


ARGV_RECORDER = textwrap.dedent(
    """
    import json, os, sys
    with open(os.environ["ARGV_FILE"], "w") as f:
        json.dump(sys.argv[1:], f)
    from mock_worker.cli import main
    raise SystemExit(main(sys.argv[1:]))  # the mock takes the worker's flags too
    """
)


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_the_worker_flags_reach_the_workers_argv(twin: str, tmp_path: Path) -> None:
    record = tmp_path / "argv.json"
    (tmp_path / "models").mkdir()
    (tmp_path / "img").mkdir()
    options: dict[str, Any] = {
        "env": ENV | {"ARGV_FILE": str(record)},
        "cwd": ROOT,
        "model_root": tmp_path / "models",
        "image_roots": [tmp_path / "img"],
        "trust_remote_code": True,
        "model": "m",
    }
    command = [sys.executable, "-c", ARGV_RECORDER, "--token-delay", "0"]
    if twin == "sync":
        with Worker(command, **options) as w:
            assert w.model is not None
    else:

        async def main() -> None:
            async with AsyncWorker(command, **options) as w:
                assert w.model is not None

        asyncio.run(main())
    assert json.loads(record.read_text()) == [
        "--token-delay",
        "0",
        f"--model-root={tmp_path / 'models'}",
        f"--image-root={tmp_path / 'img'}",
        "--trust-remote-code",
    ]
