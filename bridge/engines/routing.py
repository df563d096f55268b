"""One engine in front of two: mlx-lm for text models, mlx-vlm for vision models.

``load`` reads the model's ``config.json`` (:mod:`bridge.model_dir.kind`) and
hands the load to the engine for that kind; every other call goes to the
engine that holds the current model (at most one of them does). With no
model loaded, calls go to the text engine, which answers ``no_model``.

Loading a model of the other kind unloads the current model first. The
order of a load is the one the spec gives: resolve the path, pass the memory
gate (counting the current model's weights as freed), check that mlx-vlm is
installed for a vision model (``load_failed`` with an install hint if not);
errors up to here leave the current model loaded. Then the current model is
unloaded and the chosen engine loads.

Before anything else, :func:`bridge.model_dir.files.open_model` checks the model
directory (every file a loader reads, ``config.json`` against the weights'
headers) and, with ``model_root`` (``--model-root``), that ``path`` and
``adapter_path`` lie inside the root (``forbidden`` otherwise). The engine
then loads what was checked (``load_checked``), without reading it again.

The vision engine is built on first use, so a worker that never loads a
vision model never imports mlx-vlm.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from bridge.engines.engine_protocol import Decoder, ModelEngine, Prepared, ReportLoad
from bridge.engines.mlx.install import require_mlx
from bridge.engines.mlx.memory import available_memory
from bridge.model_dir.files import check_fits, open_model, weights_bytes
from bridge.model_dir.kind import ModelKind, model_kind
from bridge.model_dir.remote_code import remote_code_allowed
from protocol.errors import LoadFailed
from protocol.replies import AttentionFacts, MemoryStats, ModelFacts
from protocol.requests import Detokenize, GenerationRequest, Inspect, Load, Tokenize

VisionFactory = Callable[[], ModelEngine]


class RoutingEngine:
    def __init__(
        self,
        text: ModelEngine,
        vision: VisionFactory,
        *,
        memory_budget: int | None = None,
        require_vision: Callable[[str], None] | None = None,
        trust_remote_code: bool = False,
        model_root: Path | None = None,
    ) -> None:
        """``vision`` builds the vision engine on first use;
        ``require_vision(path)`` raises ``load_failed`` when the vision
        engine cannot run (by default: when mlx-vlm is not installed);
        ``model_root``, when set, confines ``load`` to that directory."""
        self._text = text
        self._vision_factory = vision
        self._vision: ModelEngine | None = None
        self._memory_budget = memory_budget
        self._require_vision = require_vision or _require_mlx_vlm
        self._current: ModelEngine = text
        self._trust_remote_code = trust_remote_code  # --trust-remote-code
        self._model_root = Path(os.path.realpath(model_root)) if model_root else None

    # -- engine thread ---------------------------------------------------------------

    def warm_up(self) -> None:
        self._text.warm_up()

    def load(self, request: Load, report: ReportLoad | None = None) -> ModelFacts:
        # before anything is read: a request may not turn on remote code by itself
        remote_code_allowed(request, worker_allows=self._trust_remote_code)
        require_mlx(request.id)  # before the vision check: mlx-vlm needs MLX too
        files = open_model(request.path, request.adapter_path, root=self._model_root)
        if request.draft_path is not None:
            draft = open_model(request.draft_path, root=self._model_root, field="draft_path")
            files = replace(files, draft=draft)
        kind = model_kind(files.config)
        if kind is ModelKind.VISION and files.draft is not None:
            raise LoadFailed(
                "draft_path: speculative decoding is for text models; this is a vision model",
                request_id=request.id,
            )
        target = self._vision_engine() if kind is ModelKind.VISION else self._text
        if target is not self._current and self._current.facts() is not None:
            # the target engine's own gate would not count the other engine's model
            check_fits(
                files.footprint(request.context_len),
                self._available_memory(),
                force=request.force,
            )
        if kind is ModelKind.VISION:
            self._require_vision(request.path)
        if target is not self._current:
            self._current.unload()
            self._current = target
        return target.load_checked(request, files, report)

    def unload(self) -> bool:
        return self._current.unload()

    def prepare(self, request: GenerationRequest) -> Prepared:
        return self._current.prepare(request)

    def decoder(self) -> Decoder:
        return self._current.decoder()

    def tokenize(self, request: Tokenize) -> tuple[int, ...]:
        return self._current.tokenize(request)

    def detokenize(self, request: Detokenize) -> str:
        return self._current.detokenize(request)

    def inspect(self, request: Inspect) -> AttentionFacts:
        # the text engine captures; the vision engine refuses with invalid_request
        return self._current.inspect(request)

    def close(self) -> None:
        if self._vision is not None:
            self._vision.close()
        self._text.close()

    # -- any thread ---------------------------------------------------------------------

    def facts(self) -> ModelFacts | None:
        return self._current.facts()

    def memory(self) -> MemoryStats:
        return self._current.memory()

    # -- helpers ------------------------------------------------------------------------

    def _vision_engine(self) -> ModelEngine:
        if self._vision is None:
            self._vision = self._vision_factory()
            self._vision.warm_up()
        return self._vision

    def _available_memory(self) -> int:
        facts = self._current.facts()
        freed = weights_bytes(Path(facts.path)) if facts else 0
        return available_memory(self._memory_budget, freed=freed)


def _require_mlx_vlm(path: str) -> None:
    from bridge.engines.vision.engine import require_mlx_vlm

    require_mlx_vlm(path)
