"""Protocol faults the mock cannot make, from a small hand-written worker.

The worker answers ``hello`` properly, then misbehaves per command:
``ping`` is answered under an unknown id, ``detokenize`` with a line over the
supervisor's limit whose id is readable, ``tokenize`` with an over-limit line
whose id is not, and ``info`` correctly (so the worker is seen to live on).
"""

from __future__ import annotations

import textwrap
import time

import pytest

from supervisor import ProtocolError, RequestError, Worker
from tests.supervisor.conftest import python_worker

pytestmark = pytest.mark.timeout(30)

SOURCE = textwrap.dedent(
    """
    import json, sys

    def send(obj):
        sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\\n")
        sys.stdout.flush()

    for line in sys.stdin:
        req = json.loads(line)
        cmd, rid = req["cmd"], req.get("id")
        if cmd == "hello":
            send({"type": "hello", "id": rid, "protocol_version": 1, "versions": {},
                  "commands": [], "sampling_options": [], "limits": {}, "pid": 0})
        elif cmd == "ping":
            send({"type": "pong", "id": 12345})
        elif cmd == "detokenize":
            send({"type": "text", "id": rid, "text": "x" * 5000})
        elif cmd == "tokenize":
            sys.stdout.write("[" + "1," * 5000 + "1]\\n")
            sys.stdout.flush()
        elif cmd == "info":
            send({"type": "error", "id": rid, "code": "no_model", "error": "no model"})
        elif cmd == "quit":
            break
    """
)


def faulty() -> Worker:
    return python_worker(SOURCE, max_line_bytes=1000, request_timeout=5.0)


def test_unknown_id_fails_the_request_in_flight() -> None:
    with faulty() as w:
        started = time.perf_counter()
        with pytest.raises(ProtocolError, match="unknown request id 12345"):
            w.ping()
        assert time.perf_counter() - started < 1.0
        with pytest.raises(RequestError, match="no_model"):
            w.info()  # the worker is kept, and still answers


def test_overlong_line_with_a_readable_id_fails_that_request() -> None:
    with faulty() as w:
        with pytest.raises(ProtocolError, match="over the limit") as caught:
            w.detokenize([1])
        assert caught.value.line.startswith(b'{"type":"text","id":')


def test_overlong_line_without_an_id_fails_every_request() -> None:
    with faulty() as w:
        with pytest.raises(ProtocolError, match="over the limit"):
            w.tokenize("x")
        with pytest.raises(RequestError, match="no_model"):
            w.info()  # still serving
