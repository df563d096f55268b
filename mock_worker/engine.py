"""``ScriptedEngine``: a :class:`bridge.engines.engine_protocol.Engine` with no model behind it.

It loads any path instantly, echoes the prompt's words as tokens (see
:mod:`mock_worker.echo`), tokenizes text as its UTF-8 bytes, answers
``inspect`` with made-up attention files of the mock model's shapes (see
:func:`attention_values`), and injects the faults of
:mod:`mock_worker.faults`. The real request loop (:func:`bridge.loop.server.serve`)
runs it, so stop strings, cancel, queueing and every reply shape are the
real worker's.
"""

from __future__ import annotations

import array
import logging
import resource
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from pathlib import Path

from bridge.engines.engine_protocol import Decoder, Prepared, ReportLoad, ShouldAbort, Step
from bridge.engines.solo import SoloDecoder
from bridge.model_dir.files import confine
from bridge.model_dir.remote_code import remote_code_allowed
from protocol.errors import InvalidRequest, NoModel, RequestId, VisionNotSupported, error_from_code
from protocol.replies import AttentionFacts, MemoryStats, ModelFacts
from protocol.requests import Chat, Detokenize, GenerationRequest, Inspect, Load, Tokenize

from . import echo
from .faults import GARBAGE_LINE, Faults, block_forever, crash, flood_stderr

log = logging.getLogger("mock_worker")

DEFAULT_CONTEXT_LEN = 4096
TIMED_TOKENS = 64
WriteRaw = Callable[[bytes], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class ScriptedPrepared(Prepared):
    """A prepared generation plus what the script needs to run it."""

    request_id: RequestId | None
    words: tuple[str, ...]
    faults: Faults


class ScriptedEngine:
    def __init__(
        self,
        *,
        faults: Faults | None = None,
        trust_remote_code: bool = False,
        model_root: Path | None = None,
    ) -> None:
        """``trust_remote_code`` and ``model_root`` are the worker's
        ``--trust-remote-code`` and ``--model-root``, refused alike: a host's
        tests see the real worker's ``forbidden`` (the mock reads no files)."""
        self._defaults = faults or Faults()
        self._trust_remote_code = trust_remote_code
        self._model_root = model_root
        self._facts: ModelFacts | None = None
        self._write_raw: WriteRaw | None = None

    def attach_output(self, write: WriteRaw) -> None:
        """Where the garbage-line fault writes (``serve``'s ``on_writer`` hook)."""
        self._write_raw = write

    # -- engine thread ---------------------------------------------------------------

    def warm_up(self) -> None:
        pass

    def load(self, request: Load, report: ReportLoad | None = None) -> ModelFacts:
        remote_code_allowed(request, worker_allows=self._trust_remote_code)
        if self._model_root is not None:
            for field, path in (("path", request.path), ("adapter_path", request.adapter_path)):
                if path is not None:
                    confine(path, field, self._model_root)
        faults = self._defaults.override(request.mock, request.id)
        if faults.load_delay:
            time.sleep(faults.load_delay)
        if faults.fail_load is not None:
            raise error_from_code(
                faults.fail_load,
                f"{request.path}: load failed with {faults.fail_load} (mock fault fail_load)",
                request_id=request.id,
            )
        self._facts = mock_facts(request.path, request.context_len or DEFAULT_CONTEXT_LEN)
        log.info("loaded %s (mock)", request.path)
        return self._facts

    def unload(self) -> bool:
        was_loaded, self._facts = self._facts is not None, None
        return was_loaded

    def prepare(self, request: GenerationRequest) -> Prepared:
        self._require(request)
        faults = self._defaults.override(request.mock, request.id)
        if isinstance(request, Chat):
            for i, message in enumerate(request.messages):
                if message.images:
                    raise VisionNotSupported(
                        f"messages[{i}].content: this model has no vision support; "
                        "image parts need a vision model",
                        request_id=request.id,
                    )
        tokens = tuple(echo.prompt_text(request).encode())
        if not tokens:
            raise InvalidRequest("prompt: encodes to zero tokens", request_id=request.id)
        return ScriptedPrepared(
            tokens=tokens,
            sampling=request.sampling,
            request_id=request.id,
            words=echo.words_of(request),
            faults=faults,
        )

    def decoder(self) -> Decoder:
        return SoloDecoder(self.generate, _peak_rss)

    def generate(
        self, prepared: Prepared, should_abort: ShouldAbort
    ) -> Generator[Step, None, None]:
        assert isinstance(prepared, ScriptedPrepared)
        faults = prepared.faults
        name = f"request {prepared.request_id!r}"
        if faults.stderr_flood:
            flood_stderr(faults.stderr_flood)
        words = prepared.words
        max_tokens = prepared.sampling.max_tokens
        # The steps are built once per generation, so the mock streams at full speed.
        cycle = echo.token_steps(words, prepared.sampling.logprobs)
        eos_at = 0 if not words else faults.eos_after
        n = 0
        while True:
            if n == faults.garbage_after:
                self._garbage(name)
            if n == faults.crash_after:
                crash(faults.exit_code, f"crash_after={n} in {name}")
            if n == faults.hang_after:
                block_forever(f"hang_after={n} in {name}")
            if faults.token_delay:
                _pause(faults.token_delay, should_abort)
            if should_abort():
                if faults.ignore_cancel:
                    block_forever(f"ignore_cancel in {name}")
                return
            if n == eos_at:
                step = Step(text="", token_id=echo.EOS_TOKEN_ID, is_eos=True, finish_reason="stop")
            else:
                step = cycle[n % len(cycle)] if n else replace(cycle[0], text=words[0])
                n += 1
                if n == max_tokens:
                    step = replace(step, finish_reason="length")
            try:
                yield step
            except GeneratorExit:
                # The loop stops reading when the request is cancelled (or hit a stop string).
                if faults.ignore_cancel and should_abort():
                    block_forever(f"ignore_cancel in {name}")
                raise
            if step.finish_reason is not None:
                return

    def tokenize(self, request: Tokenize) -> tuple[int, ...]:
        self._require(request)
        return tuple(request.text.encode())

    def detokenize(self, request: Detokenize) -> str:
        self._require(request)
        for i, token in enumerate(request.tokens):
            if token > 255:
                raise InvalidRequest(
                    f"tokens[{i}]: {token} is not a byte (mock token ids are UTF-8 bytes, 0-255)",
                    request_id=request.id,
                )
        try:
            return bytes(request.tokens).decode()
        except UnicodeDecodeError as exc:
            raise InvalidRequest(
                f"tokens: not valid UTF-8 at position {exc.start}", request_id=request.id
            ) from None

    def inspect(self, request: Inspect) -> AttentionFacts:
        # Imported here, not at start-up: only inspect writes attention files.
        from bridge.engines.text.inspect_attention import (
            AttentionCapture,
            InspectError,
            output_directory,
            requested_directory,
            save_capture,
            wire_error,
        )

        self._require(request)
        assert self._facts is not None
        facts = self._facts
        seq_len = len(request.prompt.encode())  # one token per UTF-8 byte, as in tokenize
        if not seq_len:
            raise InvalidRequest("prompt: encodes to zero tokens", request_id=request.id)
        try:
            capture = AttentionCapture(
                directory=output_directory(requested_directory(request.dir)),
                num_layers=facts.layers,
                num_q_heads=facts.num_attention_heads,
                num_kv_heads=facts.num_key_value_heads,
                seq_len=seq_len,
                head_dim=facts.head_dim,
                architecture=facts.model_type,
            )
        except InspectError as exc:
            raise wire_error(exc, request.id) from None
        q_count = capture.num_q_heads * seq_len * capture.head_dim
        k_count = capture.num_kv_heads * seq_len * capture.head_dim
        save_capture(
            capture,
            (
                (attention_values(layer, q_count), attention_values(layer, k_count, sign=-1.0))
                for layer in range(capture.num_layers)
            ),
        )
        return capture.facts()

    def close(self) -> None:
        self._facts = None

    # -- any thread ---------------------------------------------------------------------

    def facts(self) -> ModelFacts | None:
        return self._facts

    def memory(self) -> MemoryStats:
        import psutil

        rss = int(psutil.Process().memory_info().rss)
        return MemoryStats(active_bytes=0, peak_bytes=_peak_rss(), cache_bytes=0, rss_bytes=rss)

    # -- helpers ------------------------------------------------------------------------

    def _require(self, request: GenerationRequest | Tokenize | Detokenize | Inspect) -> None:
        if self._facts is None:
            raise NoModel("no model loaded; send load first", request_id=request.id)

    def _garbage(self, name: str) -> None:
        log.warning("mock fault: garbage_after in %s; writing a non-JSON line", name)
        if self._write_raw is not None:
            self._write_raw(GARBAGE_LINE)


def mock_facts(path: str, context_len: int) -> ModelFacts:
    vocab, layers, hidden, heads, kv_heads = echo.VOCAB_SIZE, 2, 64, 4, 2
    return ModelFacts(
        path=path,
        model_type="mock",
        vocab_size=vocab,
        layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        context_len=context_len,
        dtype="float32",
        quantization=None,
        parameters=vocab * hidden + layers * 12 * hidden * hidden,
    )


def attention_values(layer: int, count: int, *, sign: float = 1.0) -> bytes:
    """The mock's made-up attention data: ``count`` little-endian float32
    values, the one at flat (C-order) index ``i`` being ``sign * (layer + i /
    count)`` rounded to float32. Queries use ``sign`` 1 and keys -1, so a
    host can check that it reads the files in the right order and layout."""
    values = array.array("f", (sign * (layer + i / count) for i in range(count)))
    if sys.byteorder != "little":
        values.byteswap()
    return values.tobytes()


def _pause(seconds: float, should_abort: ShouldAbort) -> None:
    """Sleep, waking early when the request is cancelled."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and not should_abort():
        time.sleep(min(left, 0.01))


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
