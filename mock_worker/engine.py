"""``ScriptedEngine``: a :class:`bridge.engines.engine_protocol.Engine` with no model behind it.

It loads any path instantly, echoes the prompt's words as tokens (see
:mod:`mock_worker.echo`), tokenizes text as its UTF-8 bytes, answers
``inspect`` with made-up attention files of the mock model's shapes (see
:func:`attention_values`), and injects the faults of
:mod:`mock_worker.faults`. Generations run in a batch,
:class:`mock_worker.batch.ScriptedDecoder`. The real request loop
(:func:`bridge.loop.server.serve`) runs it, so stop strings, cancel,
queueing, batching and every reply shape are the real worker's.
"""

from __future__ import annotations

import array
import logging
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bridge.engines.engine_protocol import DEFAULT_MAX_CONCURRENCY, Decoder, Prepared, ReportLoad
from bridge.model_dir.files import confine
from bridge.model_dir.remote_code import remote_code_allowed
from protocol.errors import InvalidRequest, NoModel, VisionNotSupported, error_from_code
from protocol.replies import AttentionFacts, MemoryStats, ModelFacts
from protocol.requests import Chat, Detokenize, GenerationRequest, Inspect, Load, Tokenize

from . import echo
from .batch import ScriptedDecoder, ScriptedPrepared
from .faults import GARBAGE_LINE, Faults

log = logging.getLogger("mock_worker")

DEFAULT_CONTEXT_LEN = 4096
WriteRaw = Callable[[bytes], None]


class ScriptedEngine:
    def __init__(
        self,
        *,
        faults: Faults | None = None,
        trust_remote_code: bool = False,
        model_root: Path | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        """``trust_remote_code`` and ``model_root`` are the worker's
        ``--trust-remote-code`` and ``--model-root``, refused alike: a host's
        tests see the real worker's ``forbidden`` (the mock reads no files)."""
        self._defaults = faults or Faults()
        self._trust_remote_code = trust_remote_code
        self._model_root = model_root
        self._max_concurrency = max_concurrency
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
        return ScriptedDecoder(
            capacity=self._max_concurrency, garbage=self._garbage, peak_memory=_peak_rss
        )

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


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
