"""The legacy dialect exactly as go-mlx's Go backend speaks it.

go-mlx sends compact JSON with sorted keys and ``<``, ``>``, ``&`` escaped as
``\\u003c`` etc. It reads one line for ``load`` (an ``error`` key means
failure); during a stream any line with a ``done`` key ends it, an ``error``
line ends it, and *any other line counts as a token*. It cancels with
``{"cmd":"cancel"}`` and then reads, without a timeout, until ``done`` or
``error``. It quits with ``{"cmd":"quit"}``, closes stdin, and kills the
worker 2 s later.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

from ..matching import ABSENT, Check
from ..session import Exchange, Session, fail
from ..table import Case, Group
from .rules import (
    LONG,
    check_cancelled,
    check_finished,
    done_of,
    landed,
    prefill_prompt,
    round_trip,
)

__all__ = ["GROUP", "go_json"]

GO_MLX_KILL_AFTER_S = 2.0


def go_json(request: Mapping[str, object]) -> bytes:
    """``request`` encoded the way Go's ``encoding/json`` writes a map."""
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    escaped = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return escaped.encode("utf-8") + b"\n"


def _go(s: Session, request: Mapping[str, object]) -> Exchange:
    return s.legacy(request, raw=go_json(request))


def _check_stream_shape(exchange: Exchange) -> None:
    """What go-mlx's reader needs: token lines without done/error keys, then one end."""
    for line in exchange.lines[:-1]:
        if "done" in line or "error" in line or "id" in line:
            raise fail(f"a stream line go-mlx would misread: {line}")
    end = exchange.lines[-1]
    if "id" in end or ("done" not in end and "error" not in end):
        raise fail(f"go-mlx could not see the end of this stream: {end}")


def load(s: Session) -> str:
    assert s.model_path is not None
    request = {"cmd": "load", "gpu_layers": -1, "path": s.model_path}
    loaded = s.legacy_call(request, raw=go_json(request))
    s.expect(loaded, {"type": "loaded", "ok": True, "id": ABSENT, "error": ABSENT}, "go-mlx load")
    s.loaded = loaded
    return f"one line, no id, no error key; {loaded['load_ms']:.0f} ms"


def generate(s: Session) -> str:
    exchange = _go(s, {"cmd": "generate", "max_tokens": 4, "prompt": "Hello <b> & world"})
    check_finished(exchange, max_tokens=4)
    _check_stream_shape(exchange)
    return "only token lines, then one line with done"


def chat(s: Session) -> None:
    request = {
        "cmd": "chat",
        "max_tokens": 3,
        "messages": [{"content": "Say <hi> & go", "role": "user"}],
        "repeat_penalty": 1.1,
        "temperature": 0.7,
        "top_k": 40,
        "top_p": 0.9,
    }
    exchange = _go(s, request)
    check_finished(exchange, max_tokens=3)
    _check_stream_shape(exchange)


def info(s: Session) -> str:
    request = {"cmd": "info"}
    reply = s.legacy_call(request, raw=go_json(request))
    positive = Check("an integer > 0", lambda v: isinstance(v, int) and v > 0)
    pattern = {
        "type": "info",
        "id": ABSENT,
        "model_type": Check("a string", lambda v: isinstance(v, str)),
        "vocab_size": positive,
        "layers": positive,
        "hidden_size": positive,
    }
    s.expect(reply, pattern, "go-mlx info (it reads model_type, vocab_size, layers, hidden_size)")
    return f"{reply['model_type']}: {reply['layers']} layers, hidden {reply['hidden_size']}"


def other_commands(s: Session) -> str:
    s.expect(s.legacy_call({"cmd": "ping"}), {"type": "pong", "id": ABSENT}, "legacy ping")
    s.expect(s.legacy_call({"cmd": "hello"}), {"type": "hello", "id": ABSENT}, "legacy hello")
    ids = s.legacy_call({"cmd": "tokenize", "text": "Hello", "add_special_tokens": False})
    s.expect(ids, {"type": "tokens", "id": ABSENT}, "legacy tokenize")
    text = s.legacy_call({"cmd": "detokenize", "tokens": ids["tokens"]})
    s.expect(text, {"type": "text", "id": ABSENT, "text": round_trip("Hello")}, "legacy detokenize")
    gone = s.legacy_call({"cmd": "unload"})
    s.expect(gone, {"type": "unloaded", "id": ABSENT, "was_loaded": True}, "legacy unload")
    load(s)
    return "ping, hello, tokenize, detokenize, unload, load"


def errors_end_the_stream(s: Session) -> None:
    bad = _go(s, {"cmd": "generate", "max_tokens": 4, "prompt": "x", "temperature": "hot"})
    if len(bad.lines) != 1:
        raise fail(f"a bad legacy generate should get one error line, got {bad.lines}")
    s.expect(bad.lines[0], {"type": "error", "id": ABSENT, "code": "invalid_request"}, "bad field")
    _check_stream_shape(bad)


def cancel_while_decoding(s: Session) -> str:
    request = {"cmd": "generate", "max_tokens": LONG, "prompt": "Hello"}
    s.send_raw(go_json(request))
    exchange = Exchange(request=request)
    s.read_legacy(exchange, until_tokens=2)
    s.send_raw(go_json({"cmd": "cancel"}))
    s.read_legacy(exchange)
    phase = check_cancelled(exchange)
    _check_stream_shape(exchange)
    if phase != "decode":
        raise fail(f"cancelled after 2 tokens, but the done line says {phase}")
    return f"done/cancelled after {len(exchange.tokens)} tokens"


def cancel_in_prefill(s: Session) -> str:
    prompt = prefill_prompt(s)
    request = {"cmd": "generate", "max_tokens": LONG, "prompt": prompt}
    s.send_raw(go_json(request), note=f'{{"cmd":"generate", a {len(prompt):,}-char prompt}}')
    exchange = Exchange(request=request)
    time.sleep(0.1)
    sent = time.monotonic()
    s.send_raw(go_json({"cmd": "cancel"}))
    s.read_legacy(exchange)
    took = time.monotonic() - sent
    phase = check_cancelled(exchange)
    _check_stream_shape(exchange)
    done = done_of(exchange)
    return landed(phase, done, took)


def quit_(s: Session) -> str:
    s.send_raw(go_json({"cmd": "quit"}))
    s.close_stdin()
    _, seconds = s.expect_end(within=GO_MLX_KILL_AFTER_S)
    return f"no reply, exit 0 within {seconds * 1000:.0f} ms (go-mlx kills after 2 s)"


GROUP = Group(
    name="go-mlx",
    about="the legacy dialect, byte for byte as go-mlx writes it",
    model=True,
    same_worker=True,
    cases=(
        Case(name="load", run=load),
        Case(name="generate", run=generate),
        Case(name="chat with sampling options", run=chat),
        Case(name="info", run=info),
        Case(name="every other command, no id", run=other_commands),
        Case(name="an error line ends the stream", run=errors_end_the_stream),
        Case(name="cancel while decoding", run=cancel_while_decoding),
        Case(name="cancel during prefill", run=cancel_in_prefill),
        Case(name="quit, close stdin: exit 0 in 2 s", run=quit_, ends_worker=True),
    ),
)
