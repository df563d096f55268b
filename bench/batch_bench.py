"""Concurrent requests: the worker against in-process mlx-lm and ``mlx_lm.server``, in one run.

    python bench/batch_bench.py --model DIR [--concurrency 1,4,8,16,32,64]
        [--max-tokens 256] [--sections ...] [--skip-server] [--out FILE]

Sections (``--sections`` picks some; each is guarded, so one that fails records
its error in the JSON and the others still run):

- ``stream_generate``: in-process ``mlx_lm.stream_generate``, one stream (N=1
  only): decode tok/s without the first token, time to first token;
- ``batch_generator``: in-process mlx-lm ``BatchGenerator``, the N prompts
  inserted at once: aggregate tok/s (all tokens / wall), median first token;
- ``pipe``: ``python -m bridge`` through the raw pipe, addressed dialect: N
  ``generate`` lines with distinct ids written at once, every line stamped on
  arrival: aggregate tok/s (tokens / (last ``done`` - first send)), median and
  max first token (send -> first token line of that id), errors by code, the
  ``done`` lines' ``ttft_ms`` and ``queue_ms``;
- ``supervisor``: the same through ``supervisor.Worker``, one thread per stream;
- ``server``: ``mlx_lm.server`` with N streaming HTTP clients on
  ``/v1/completions`` (stdlib ``http.client``, SSE): aggregate tok/s, median
  first token, failed streams (connection resets) counted, not raised;
- ``cancel``: 16 streams decoding in the worker, cancelled one by one: cancel
  line written -> that id's ``done``, p50/p99, against the decode step (median
  inter-token gap of one stream just before) + 10 ms;
- ``prefill_gap``: K streams decoding in the worker, then one ``generate`` with
  a ~8,000-token prompt: the K streams' inter-token gaps between its send and
  its first token (p50/p99/max), against the decode step measured before.

Greedy (temperature 0), distinct prompts per stream (chunks of standard-library
source), each concurrency warmed up once with other prompts and a few tokens
before it is timed. The worker runs with ``--prompt-cache-entries 0`` (every
request prefills, as in process); ``--worker-arg`` adds flags.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STDLIB = Path(os.__file__).parent
SOURCES = [
    "os.py",
    "textwrap.py",
    "argparse.py",
    "dataclasses.py",
    "functools.py",
    "pprint.py",
    "typing.py",
    "inspect.py",
    "subprocess.py",
    "threading.py",
]
SECTIONS = (
    "solo_ab",
    "stream_generate",
    "batch_generator",
    "pipe",
    "supervisor",
    "server",
    "cancel",
    "prefill_gap",
)
CORPUS = "".join((STDLIB / name).read_text() for name in SOURCES if (STDLIB / name).exists())
ROUNDS = itertools.count()
WARM_OFFSET = 1000  # warm-up prompts are chunks this many places further on


def prompt(i: int, chars: int) -> str:
    """The i-th distinct prompt: a chunk of standard-library source."""
    start = (i * chars) % max(1, len(CORPUS) - chars)
    return f"# Stream {i}. Continue this code.\n" + CORPUS[start : start + chars]


def prompts(n: int, chars: int, *, warm: bool = False) -> list[str]:
    base = WARM_OFFSET if warm else 0
    return [prompt(base + i, chars) for i in range(n)]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def spread(values: list[float]) -> dict[str, float | None]:
    return {"p50": median(values), "p99": pct(values, 0.99), "max": max(values, default=None)}


def decode_tps(stamps: list[float]) -> float | None:
    """One stream's decode rate: tokens after the first over the time since it."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return None
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def decode_median(streams: list[list[float]]) -> float | None:
    return median([r for r in map(decode_tps, streams) if r is not None])


def repeated(fn: Callable[[], dict[str, Any]], times: int) -> dict[str, Any]:
    """Run a round ``times`` times: the median round by aggregate tok/s, with the
    medians of its first-token and decode figures over all rounds."""
    rows = [fn() for _ in range(max(1, times))]
    rows.sort(key=lambda row: row.get("aggregate_tps") or 0.0)
    out = dict(rows[len(rows) // 2])
    for key in ("ttft_ms_median", "decode_tps_median"):
        values = [row[key] for row in rows if row.get(key) is not None]
        out[key] = median(values)
    out["repeats"] = len(rows)
    out["repeats_tps"] = [row.get("aggregate_tps") for row in rows]
    return out


def guarded(fn: Callable[[], Any]) -> Any:
    """Run one section (or one concurrency of it); a failure is recorded, not raised."""
    started = time.perf_counter()
    try:
        return fn()
    except Exception as exc:  # a benchmark section must not stop the run
        sys.stderr.write(traceback.format_exc())
        return {
            "error": f"{type(exc).__name__}: {exc}",
            "after_s": time.perf_counter() - started,
        }


def log(message: str) -> None:
    sys.stderr.write(f"[batch_bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


# -- the worker through the raw pipe ----------------------------------------------------


class MuxPipe:
    """A worker child; a reader thread stamps every stdout line and files it by id."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
            cwd=ROOT,
        )
        self.cond = threading.Condition()
        self.by_id: dict[Any, list[tuple[float, dict[str, Any]]]] = {}
        self.ended: set[Any] = set()
        self.closed = False
        self.write_lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            t = time.perf_counter()
            line = json.loads(raw)
            rid = line.get("id")
            with self.cond:
                self.by_id.setdefault(rid, []).append((t, line))
                if line.get("type") not in ("token", "progress"):
                    self.ended.add(rid)
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def send(self, *requests: dict[str, Any]) -> float:
        """Write the lines in one write; returns the time just before it."""
        assert self.proc.stdin is not None
        data = b"".join(json.dumps(r).encode() + b"\n" for r in requests)
        with self.write_lock:
            t = time.perf_counter()
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        return t

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (holding nothing) until ``predicate()`` holds under the lock."""
        deadline = time.perf_counter() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.perf_counter()
                if self.closed:
                    raise RuntimeError(f"worker exited: {self.stderr_tail()}")
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def terminal(self, rid: Any, timeout: float = 600) -> tuple[float, dict[str, Any]]:
        if not self.wait(lambda: rid in self.ended, timeout):
            raise TimeoutError(f"no terminal line for {rid!r} within {timeout} s")
        with self.cond:
            return self.by_id[rid][-1]

    def lines(self, rid: Any) -> list[tuple[float, dict[str, Any]]]:
        with self.cond:
            return list(self.by_id.get(rid, []))

    def token_stamps(self, rid: Any) -> list[float]:
        return [t for t, line in self.lines(rid) if line.get("type") == "token"]

    def count_tokens(self, rid: Any) -> int:
        return sum(1 for _, line in self.by_id.get(rid, []) if line.get("type") == "token")

    def call(self, request: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        self.send(request)
        return self.terminal(request["id"], timeout)[1]

    def stderr_tail(self, chars: int = 2000) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-chars:]

    def close(self) -> None:
        try:
            self.send({"cmd": "quit"})
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def times(args: argparse.Namespace, n: int) -> int:
    """Rounds of one concurrency: ``--rounds`` for a lone request (its figures are
    single streams, so noisier), ``--repeat`` otherwise."""
    return args.rounds if n == 1 else args.repeat


def worker_args(args: argparse.Namespace) -> list[str]:
    return ["--prompt-cache-entries", "0", *args.worker_arg]


def open_pipe(args: argparse.Namespace) -> tuple[MuxPipe, dict[str, Any], dict[str, Any]]:
    pipe = MuxPipe(worker_args(args))
    hello = pipe.call({"cmd": "hello", "id": "hello"}, timeout=120)
    loaded = pipe.call({"cmd": "load", "id": "load", "path": args.model}, timeout=600)
    if loaded.get("type") != "loaded":
        pipe.close()
        raise RuntimeError(f"load failed: {loaded}")
    return pipe, hello, loaded


def generate_line(rid: str, text: str, max_tokens: int) -> dict[str, Any]:
    return {
        "cmd": "generate",
        "id": rid,
        "prompt": text,
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }


def pipe_round(pipe: MuxPipe, tag: str, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """N generate lines written at once; figures from the arrival stamps."""
    serial = next(ROUNDS)  # ids stay unique when a round repeats
    ids = [f"{tag}-{serial}-{i}" for i in range(len(texts))]
    sent = pipe.send(
        *(generate_line(rid, t, max_tokens) for rid, t in zip(ids, texts, strict=True))
    )
    ends = [pipe.terminal(rid) for rid in ids]
    ttfts: list[float] = []
    tokens = 0
    errors: dict[str, int] = {}
    done_ttft: list[float] = []
    done_queue: list[float] = []
    for rid, (_, end) in zip(ids, ends, strict=True):
        stamps = pipe.token_stamps(rid)
        tokens += len(stamps)
        if stamps:
            ttfts.append((stamps[0] - sent) * 1000)
        if end.get("type") == "done":
            if end.get("ttft_ms") is not None:
                done_ttft.append(end["ttft_ms"])
            done_queue.append(end.get("queue_ms", 0.0))
        else:
            code = str(end.get("code", end.get("type")))
            errors[code] = errors.get(code, 0) + 1
    wall = max(t for t, _ in ends) - sent
    return {
        "streams": len(texts),
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tps": tokens / wall if wall > 0 else None,
        "decode_tps_median": decode_median([pipe.token_stamps(rid) for rid in ids]),
        "ttft_ms_median": median(ttfts),
        "ttft_ms_max": max(ttfts, default=None),
        "errors": errors,
        "busy": errors.get("busy", 0),
        "done_ttft_ms": spread(done_ttft),
        "done_queue_ms": spread(done_queue),
    }


def section_pipe(args: argparse.Namespace) -> dict[str, Any]:
    pipe, hello, loaded = open_pipe(args)
    out: dict[str, Any] = {"limits": hello.get("limits"), "load_ms": loaded.get("load_ms")}
    try:
        for n in args.concurrency:
            log(f"pipe N={n}")

            def one(n: int = n) -> dict[str, Any]:
                warm = prompts(n, args.prompt_chars, warm=True)
                pipe_round(pipe, f"w{n}", warm, args.warm_tokens)
                texts = prompts(n, args.prompt_chars)
                return repeated(
                    lambda: pipe_round(pipe, f"p{n}", texts, args.max_tokens), times(args, n)
                )

            out[str(n)] = guarded(one)
    finally:
        pipe.close()
    return out


# -- the worker through supervisor -------------------------------------------------------


def supervisor_round(worker: Any, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """One thread per stream, all released together by a barrier."""
    barrier = threading.Barrier(len(texts))

    def stream(text: str) -> dict[str, Any]:
        barrier.wait()
        sent = time.perf_counter()
        stamps: list[float] = []
        try:
            with worker.generate(text, max_tokens=max_tokens, temperature=0.0) as s:
                for _ in s:
                    stamps.append(time.perf_counter())
                result = s.result
            return {
                "sent": sent,
                "stamps": stamps,
                "end": time.perf_counter(),
                "ttft_ms": result.timings.ttft_ms,
                "queue_ms": result.timings.queue_ms,
            }
        except Exception as exc:  # counted, not raised
            code = getattr(exc, "code", type(exc).__name__)
            return {"sent": sent, "stamps": stamps, "end": time.perf_counter(), "error": code}

    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
        rows = list(pool.map(stream, texts))
    first = min(r["sent"] for r in rows)
    last = max(r["end"] for r in rows)
    tokens = sum(len(r["stamps"]) for r in rows)
    ttfts = [(r["stamps"][0] - r["sent"]) * 1000 for r in rows if r["stamps"]]
    errors: dict[str, int] = {}
    for r in rows:
        if "error" in r:
            errors[str(r["error"])] = errors.get(str(r["error"]), 0) + 1
    wall = last - first
    return {
        "streams": len(texts),
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tps": tokens / wall if wall > 0 else None,
        "decode_tps_median": decode_median([r["stamps"] for r in rows]),
        "ttft_ms_median": median(ttfts),
        "ttft_ms_max": max(ttfts, default=None),
        "errors": errors,
        "busy": errors.get("busy", 0),
        "done_ttft_ms": spread([r["ttft_ms"] for r in rows if r.get("ttft_ms") is not None]),
        "done_queue_ms": spread([r["queue_ms"] for r in rows if "queue_ms" in r]),
    }


def section_supervisor(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from supervisor import Worker

    command = [sys.executable, "-m", "bridge", *worker_args(args)]
    out: dict[str, Any] = {}
    with Worker(
        command, model=args.model, cwd=ROOT, env={"HF_HUB_OFFLINE": "1"}, start_timeout=120
    ) as worker:
        for n in args.concurrency:
            log(f"supervisor N={n}")

            def one(n: int = n) -> dict[str, Any]:
                supervisor_round(worker, prompts(n, args.prompt_chars, warm=True), args.warm_tokens)
                texts = prompts(n, args.prompt_chars)
                return repeated(
                    lambda: supervisor_round(worker, texts, args.max_tokens), times(args, n)
                )

            out[str(n)] = guarded(one)
    return out


# -- in process -------------------------------------------------------------------------


class InProcess:
    """The model loaded once in this process, for the in-process sections."""

    def __init__(self, model_dir: str) -> None:
        import mlx_lm

        self.model, self.tokenizer = mlx_lm.load(model_dir)

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))


def section_stream_generate(args: argparse.Namespace, mlx: InProcess) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=0.0)
    rows: list[dict[str, Any]] = []
    for r in range(args.rounds + 1):  # round 0 warms up
        text = prompt(WARM_OFFSET if r == 0 else r, args.prompt_chars)
        ids = mx.array(mlx.ids(text))
        tokens = args.warm_tokens if r == 0 else args.max_tokens
        started = time.perf_counter()
        stamps = []
        last = None
        for response in stream_generate(
            mlx.model, mlx.tokenizer, ids, max_tokens=tokens, sampler=sampler
        ):
            stamps.append(time.perf_counter())
            last = response
        if r and len(stamps) > 1:
            rows.append(
                {
                    "tokens": len(stamps),
                    "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                    "ttft_ms": (stamps[0] - started) * 1000,
                    "mlx_generation_tps": getattr(last, "generation_tps", None),
                }
            )
    return {
        "rounds": rows,
        "decode_tps": median([row["decode_tps"] for row in rows]),
        "ttft_ms": median([row["ttft_ms"] for row in rows]),
        "tokens": median([row["tokens"] for row in rows]),
    }


def section_solo_ab(args: argparse.Namespace, mlx: InProcess) -> dict[str, Any]:
    """One stream, in process and through the pipe by turns (the first pair
    warms up), so that both see the same moment of a shared, noisy machine."""
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=0.0)
    pipe, _, _ = open_pipe(args)
    rows: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds + 2):
            text = prompt(WARM_OFFSET + 500 + r, args.prompt_chars)
            started = time.perf_counter()
            stamps = []
            for _ in stream_generate(
                mlx.model,
                mlx.tokenizer,
                mx.array(mlx.ids(text)),
                max_tokens=args.max_tokens,
                sampler=sampler,
            ):
                stamps.append(time.perf_counter())
            piped = pipe_round(pipe, "ab", [text], args.max_tokens)
            ip_tps = decode_tps(stamps)
            if r and ip_tps and piped["decode_tps_median"]:
                rows.append(
                    {
                        "in_process_tps": ip_tps,
                        "in_process_ttft_ms": (stamps[0] - started) * 1000,
                        "pipe_tps": piped["decode_tps_median"],
                        "pipe_ttft_ms": piped["ttft_ms_median"],
                        "ratio": piped["decode_tps_median"] / ip_tps,
                    }
                )
    finally:
        pipe.close()
    return {
        "rounds": rows,
        "ratio_median": median([row["ratio"] for row in rows]),
        "in_process_tps": median([row["in_process_tps"] for row in rows]),
        "pipe_tps": median([row["pipe_tps"] for row in rows]),
        "in_process_ttft_ms": median([row["in_process_ttft_ms"] for row in rows]),
        "pipe_ttft_ms": median([row["pipe_ttft_ms"] for row in rows]),
    }


def batch_round(mlx: InProcess, texts: list[str], max_tokens: int) -> dict[str, Any]:
    from mlx_lm.generate import BatchGenerator

    eos = sorted(getattr(mlx.tokenizer, "eos_token_ids", None) or [mlx.tokenizer.eos_token_id])
    completion = max(32, len(texts))
    gen = BatchGenerator(
        mlx.model,
        max_tokens=max_tokens,
        stop_tokens=[[e] for e in eos],
        completion_batch_size=completion,
    )
    try:
        encoded = [mlx.ids(t) for t in texts]
        started = time.perf_counter()
        uids = gen.insert(encoded, max_tokens=[max_tokens] * len(texts))
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        counts = dict.fromkeys(uids, 0)
        live = set(uids)
        idle = 0
        while live:
            responses = gen.next_generated()
            now = time.perf_counter()
            if not responses:
                idle += 1
                if idle > 1000:
                    raise RuntimeError(f"BatchGenerator stalled with {len(live)} left")
                continue
            idle = 0
            for resp in responses:
                counts[resp.uid] += 1
                first.setdefault(resp.uid, now)
                last[resp.uid] = now
                if resp.finish_reason is not None:
                    live.discard(resp.uid)
        wall = time.perf_counter() - started
    finally:
        gen.close()
    tokens = sum(counts.values())
    ttfts = [(t - started) * 1000 for t in first.values()]
    return {
        "streams": len(texts),
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tps": tokens / wall,
        "decode_tps_median": median(
            [(counts[u] - 1) / (last[u] - first[u]) for u in first if last[u] > first[u]]
        ),
        "ttft_ms_median": median(ttfts),
        "ttft_ms_max": max(ttfts, default=None),
        "completion_batch_size": completion,
    }


def section_batch_generator(args: argparse.Namespace, mlx: InProcess) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in args.concurrency:
        log(f"batch_generator N={n}")

        def one(n: int = n) -> dict[str, Any]:
            batch_round(mlx, prompts(n, args.prompt_chars, warm=True), args.warm_tokens)
            texts = prompts(n, args.prompt_chars)
            return repeated(lambda: batch_round(mlx, texts, args.max_tokens), times(args, n))

        out[str(n)] = guarded(one)
    return out


# -- mlx_lm.server ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sse_events(response: http.client.HTTPResponse) -> Iterator[str]:
    """The ``data:`` payloads of a server-sent event stream."""
    data: list[str] = []
    for raw in response:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield "\n".join(data)


def server_stream(port: int, text: str, max_tokens: int) -> dict[str, Any]:
    body = json.dumps(
        {
            "prompt": text,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    sent = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            conn.request(
                "POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"}
            )
            response = conn.getresponse()
            if response.status != 200:
                return {"sent": sent, "end": time.perf_counter(), "tokens": 0,
                        "error": f"HTTP {response.status}"}  # fmt: skip
            for data in sse_events(response):
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter()
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return {
            "sent": sent,
            "end": time.perf_counter(),
            "first": first,
            "tokens": chunks,
            "error": type(exc).__name__,
        }
    tokens = usage["completion_tokens"] if usage else chunks
    return {"sent": sent, "end": time.perf_counter(), "first": first, "tokens": tokens}


def server_round(port: int, texts: list[str], max_tokens: int) -> dict[str, Any]:
    barrier = threading.Barrier(len(texts))

    def one(text: str) -> dict[str, Any]:
        barrier.wait()
        return server_stream(port, text, max_tokens)

    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
        rows = list(pool.map(one, texts))
    first = min(r["sent"] for r in rows)
    wall = max(r["end"] for r in rows) - first
    tokens = sum(r["tokens"] for r in rows)
    ttfts = [(r["first"] - r["sent"]) * 1000 for r in rows if r.get("first")]
    failures: dict[str, int] = {}
    for r in rows:
        if "error" in r:
            failures[r["error"]] = failures.get(r["error"], 0) + 1
    return {
        "streams": len(texts),
        "tokens": tokens,
        "tokens_asked": len(texts) * max_tokens,
        "wall_s": wall,
        "aggregate_tps": tokens / wall if wall > 0 else None,
        "ttft_ms_median": median(ttfts),
        "ttft_ms_max": max(ttfts, default=None),
        "failures": failures,
        "failed_streams": sum(failures.values()),
    }


def section_server(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    log_file = tempfile.TemporaryFile()
    command = [
        sys.executable,
        "-m",
        "mlx_lm",
        "server",
        "--model",
        args.model,
        "--port",
        str(port),
        "--log-level",
        "WARNING",
        *args.server_arg,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
    )

    def tail() -> str:
        log_file.seek(0)
        return log_file.read().decode(errors="replace")[-2000:]

    out: dict[str, Any] = {"command": command[2:]}
    try:
        deadline = time.perf_counter() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlx_lm.server exited {proc.returncode}: {tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/v1/models")
                ready = conn.getresponse().status == 200
                conn.close()
                if ready:
                    break
            except OSError:
                pass
            if time.perf_counter() > deadline:
                raise TimeoutError(f"mlx_lm.server not ready within 300 s: {tail()}")
            time.sleep(0.25)
        warm = server_stream(port, prompt(WARM_OFFSET - 1, args.prompt_chars), args.warm_tokens)
        if "error" in warm:
            raise RuntimeError(f"warm-up request failed: {warm['error']}: {tail()}")
        for n in args.concurrency:
            log(f"server N={n}")

            def one(n: int = n) -> dict[str, Any]:
                server_round(port, prompts(n, args.prompt_chars, warm=True), args.warm_tokens)
                texts = prompts(n, args.prompt_chars)
                return repeated(lambda: server_round(port, texts, args.max_tokens), times(args, n))

            out[str(n)] = guarded(one)
            if proc.poll() is not None:
                out["exited"] = {"returncode": proc.returncode, "log_tail": tail()}
                break
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()
    return out


# -- cancel latency and prefill gap (worker, raw pipe) -------------------------------------


def start_streams(
    pipe: MuxPipe, tag: str, n: int, args: argparse.Namespace, max_tokens: int
) -> list[str]:
    ids = [f"{tag}-{i}" for i in range(n)]
    pipe.send(
        *(generate_line(rid, prompt(2000 + i, args.prompt_chars), max_tokens) for i, rid in
          enumerate(ids))
    )  # fmt: skip
    return ids


def settle(pipe: MuxPipe, ids: list[str], tokens: int, timeout: float) -> bool:
    """Wait until every stream has ``tokens`` tokens (or the time is up)."""

    def ready() -> bool:
        return all(pipe.count_tokens(rid) >= tokens or rid in pipe.ended for rid in ids)

    return pipe.wait(ready, timeout)


def gaps(
    stamps: list[float], after: float = float("-inf"), before: float = float("inf")
) -> list[float]:
    """Inter-token gaps (ms) of one stream whose pair straddles or lies in (after, before)."""
    return [
        (b - a) * 1000
        for a, b in zip(stamps[:-1], stamps[1:], strict=True)
        if b > after and a < before
    ]


def decode_step(pipe: MuxPipe, ids: list[str], last: int = 8) -> float | None:
    """The median of each running stream's last ``last`` inter-token gaps, pooled."""
    pooled: list[float] = []
    for rid in ids:
        if rid in pipe.ended:
            continue
        pooled += gaps(pipe.token_stamps(rid))[-last:]
    return median(pooled)


def finish_all(pipe: MuxPipe, ids: list[str]) -> None:
    left = [rid for rid in ids if rid not in pipe.ended]
    if left:
        pipe.send(*({"cmd": "cancel", "id": rid} for rid in left))
    for rid in ids:
        pipe.terminal(rid, timeout=120)


def section_cancel(args: argparse.Namespace) -> dict[str, Any]:
    pipe, _, _ = open_pipe(args)
    try:
        warm = start_streams(pipe, "cw", args.cancel_streams, args, args.warm_tokens)
        for rid in warm:
            pipe.terminal(rid)
        ids = start_streams(pipe, "c", args.cancel_streams, args, args.stream_max_tokens)
        settled = settle(pipe, ids, 12, args.settle_s)
        step = decode_step(pipe, ids)
        running_before = sum(1 for rid in ids if pipe.count_tokens(rid) and rid not in pipe.ended)
        latencies: dict[str, list[float]] = {"decoding": [], "queued": []}
        reasons: dict[str, int] = {}
        ended_first = 0  # ended (max_tokens, eos) before their cancel was written
        for rid in ids:
            before = sum(pipe.count_tokens(r) for r in ids)
            # a few more tokens between cancels, so each lands in the middle of decoding
            pipe.wait(lambda b=before: sum(pipe.count_tokens(r) for r in ids) >= b + 3, 2.0)
            if rid in pipe.ended:
                ended_first += 1
                continue
            phase = "decoding" if pipe.count_tokens(rid) else "queued"
            sent = pipe.send({"cmd": "cancel", "id": rid})
            t, end = pipe.terminal(rid, timeout=120)
            if t < sent:
                ended_first += 1
                continue
            reason = str(end.get("finish_reason", end.get("code", end.get("type"))))
            reasons[reason] = reasons.get(reason, 0) + 1
            latencies[phase].append((t - sent) * 1000)
        decoding = latencies["decoding"]
        p99 = pct(decoding, 0.99)
        bound = step + 10 if step is not None else None
        return {
            "streams": args.cancel_streams,
            "all_decoding_before": settled,
            "decoding_before": running_before,
            "decode_step_ms": step,
            "cancelled_decoding": len(decoding),
            "cancelled_queued": len(latencies["queued"]),
            "ended_before_cancel": ended_first,
            "p50_ms": pct(decoding, 0.5),
            "p99_ms": p99,
            "max_ms": max(decoding, default=None),
            "queued_p50_ms": pct(latencies["queued"], 0.5),
            "bound_ms": bound,
            "p99_over_bound": p99 / bound if bound and p99 is not None else None,
            "finish_reasons": reasons,
            "latencies_ms": latencies,
        }
    finally:
        pipe.close()


def section_prefill_gap(args: argparse.Namespace) -> dict[str, Any]:
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(Path(args.model))
    text = CORPUS
    size = args.long_prompt_tokens
    while len(tokenizer.encode(text)) < 3 * size + 16:
        text += CORPUS
    ids_all = tokenizer.encode(text)
    warm_text, solo_text, long_text = (
        tokenizer.decode(ids_all[i * size : (i + 1) * size]) for i in range(3)
    )
    pipe, hello, _ = open_pipe(args)
    try:
        # the first long prefill compiles kernels: once alone, another text
        solo = pipe.call(generate_line("long-warm", warm_text, 1))
        solo2 = pipe.call(generate_line("long-solo", solo_text, 1))
        limits = hello.get("limits") or {}
        chunk_tokens = limits.get("prefill_chunk_tokens") or args.prefill_chunk_tokens
        chunk_ms = None
        if solo2.get("type") == "done" and chunk_tokens and solo2.get("ttft_ms"):
            chunks = max(1, -(-solo2["prompt_tokens"] // chunk_tokens))
            chunk_ms = solo2["ttft_ms"] / chunks
        ids = start_streams(pipe, "g", args.gap_streams, args, args.stream_max_tokens)
        settled = settle(pipe, ids, 12, args.settle_s)
        step = decode_step(pipe, ids)
        sent = pipe.send(generate_line("long", long_text, 4))
        # Not all K decoding together (a worker that runs one at a time): the long request
        # queues behind them, so the wait is cut short and the figures say so.
        timeout = args.gap_timeout_s if settled else min(args.gap_timeout_s, 10.0)
        got_first = pipe.wait(
            lambda: pipe.count_tokens("long") > 0 or "long" in pipe.ended, timeout
        )
        stamps = pipe.token_stamps("long")
        first = stamps[0] if stamps else time.perf_counter()
        window: list[float] = []
        for rid in ids:
            window += gaps(pipe.token_stamps(rid), after=sent, before=first)
        finish_all(pipe, ids)
        long_end = pipe.terminal("long", timeout=600)[1]
        p99 = pct(window, 0.99)
        bound = step + chunk_ms + 10 if step is not None and chunk_ms is not None else None
        return {
            "streams": args.gap_streams,
            "all_decoding_before": settled,
            "long_first_token_within_timeout": got_first,
            "long_ttft_ms": (first - sent) * 1000,
            "long_done": {
                k: long_end.get(k) for k in ("type", "prompt_tokens", "ttft_ms", "queue_ms", "code")
            },  # fmt: skip
            "solo_long": {k: solo2.get(k) for k in ("prompt_tokens", "ttft_ms")},
            "solo_warm_ms": solo.get("ttft_ms"),
            "prefill_chunk_tokens": chunk_tokens,
            "prefill_chunk_ms": chunk_ms,
            "decode_step_ms": step,
            "gaps": len(window),
            "gap_ms": spread(window),
            "bound_ms": bound,
            "p99_over_bound": p99 / bound if bound and p99 is not None else None,
        }
    finally:
        pipe.close()


# -- the run ----------------------------------------------------------------------------


def summary(sections: dict[str, Any], concurrency: list[int]) -> dict[str, Any]:
    """One row per concurrency: aggregate tok/s and median first token, side by side."""

    def figure(section: str, n: int, key: str) -> Any:
        row = sections.get(section)
        if not isinstance(row, dict):
            return None
        cell = row.get(str(n))
        return cell.get(key) if isinstance(cell, dict) else None

    sg = sections.get("stream_generate")
    sg_tps = sg.get("decode_tps") if isinstance(sg, dict) else None
    sg_ttft = sg.get("ttft_ms") if isinstance(sg, dict) else None
    rows = {}
    for n in concurrency:
        row: dict[str, Any] = {}
        for name in ("batch_generator", "pipe", "supervisor", "server"):
            row[f"{name}_tps"] = figure(name, n, "aggregate_tps")
            row[f"{name}_ttft_ms"] = figure(name, n, "ttft_ms_median")
        for name in ("pipe", "supervisor"):
            tps = row[f"{name}_tps"]
            for ref in ("batch_generator", "server"):
                if tps and row[f"{ref}_tps"]:
                    row[f"{name}_over_{ref}"] = tps / row[f"{ref}_tps"]
            decode = figure(name, n, "decode_tps_median")
            if n == 1 and decode and sg_tps:
                row[f"{name}_decode_tps"] = decode
                row[f"{name}_decode_over_stream_generate"] = decode / sg_tps
            if n == 1 and sg_ttft is not None and row[f"{name}_ttft_ms"] is not None:
                row[f"{name}_ttft_minus_stream_generate_ms"] = row[f"{name}_ttft_ms"] - sg_ttft
            row[f"{name}_busy"] = figure(name, n, "busy")
            row[f"{name}_errors"] = figure(name, n, "errors")
        row["server_failed_streams"] = figure("server", n, "failed_streams")
        if n == 1:
            row["stream_generate_tps"] = sg_tps
            row["stream_generate_ttft_ms"] = sg_ttft
        rows[str(n)] = row
    return rows


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", default="1,4,8,16,32,64", help="comma-separated N values")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--warm-tokens", type=int, default=8, help="tokens of each warm-up round")
    p.add_argument("--prompt-chars", type=int, default=400, help="characters of each prompt")
    p.add_argument(
        "--rounds", type=int, default=3, help="rounds of stream_generate and of N=1 (median)"
    )
    p.add_argument("--repeat", type=int, default=1, help="rounds of each N > 1 (median)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: %(default)s")
    p.add_argument("--skip-server", action="store_true", help="leave out mlx_lm.server")
    p.add_argument("--cancel-streams", type=int, default=16)
    p.add_argument("--gap-streams", type=int, default=8, help="K streams decoding (prefill_gap)")
    p.add_argument("--long-prompt-tokens", type=int, default=8000)
    p.add_argument(
        "--stream-max-tokens",
        type=int,
        default=4096,
        help="max_tokens of the streams kept decoding in cancel and prefill_gap",
    )
    p.add_argument("--settle-s", type=float, default=10.0, help="wait for all streams to decode")
    p.add_argument("--gap-timeout-s", type=float, default=120.0)
    p.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=None,
        help="prefill chunk for the gap bound when hello's limits lack prefill_chunk_tokens",
    )
    p.add_argument("--worker-arg", action="append", default=[], help="extra worker flag")
    p.add_argument("--server-arg", action="append", default=[], help="extra mlx_lm.server flag")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    args.concurrency = [int(n) for n in args.concurrency.split(",") if n.strip()]
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    if args.skip_server:
        chosen = [s for s in chosen if s != "server"]
    if args.prefill_chunk_tokens is None:
        for i, flag in enumerate(args.worker_arg):
            if flag.startswith("--prefill-step-size="):
                args.prefill_chunk_tokens = int(flag.split("=", 1)[1])
            elif flag == "--prefill-step-size" and i + 1 < len(args.worker_arg):
                args.prefill_chunk_tokens = int(args.worker_arg[i + 1])
        if args.prefill_chunk_tokens is None:
            args.prefill_chunk_tokens = 256  # the worker's default today

    import mlx.core as mx
    import mlx_lm

    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "device": str(mx.default_device()),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": getattr(mlx_lm, "__version__", None),
        "model": args.model,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "prompt_chars": args.prompt_chars,
        "worker_args": worker_args(args),
        "argv": sys.argv[1:],
    }
    sections: dict[str, Any] = {}
    results["sections"] = sections
    started = time.perf_counter()

    def keep() -> None:
        """Write what is measured so far: a run cut off by a time limit keeps it."""
        if args.out:
            results["wall_s"] = time.perf_counter() - started
            results["summary"] = summary(sections, args.concurrency)
            args.out.write_text(json.dumps(results, indent=2) + "\n")

    if {"solo_ab", "stream_generate", "batch_generator"} & set(chosen):
        loaded = guarded(lambda: InProcess(args.model))
        for name in ("solo_ab", "stream_generate", "batch_generator"):
            if name not in chosen:
                continue
            log(name)
            if isinstance(loaded, dict):
                sections[name] = {"error": f"load: {loaded['error']}"}
            elif name == "stream_generate":
                sections[name] = guarded(lambda: section_stream_generate(args, loaded))
            elif name == "solo_ab":
                sections[name] = guarded(lambda: section_solo_ab(args, loaded))
            else:
                sections[name] = guarded(lambda: section_batch_generator(args, loaded))
            keep()
        del loaded
        mx.clear_cache()
    runners: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
        "pipe": section_pipe,
        "supervisor": section_supervisor,
        "server": section_server,
        "cancel": section_cancel,
        "prefill_gap": section_prefill_gap,
    }
    for name, run in runners.items():
        if name in chosen:
            log(name)
            sections[name] = guarded(lambda run=run: run(args))
            keep()
    results["wall_s"] = time.perf_counter() - started
    results["summary"] = summary(sections, args.concurrency)
    text = json.dumps(results, indent=2)
    sys.stdout.write(text + "\n")
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
