"""Vision sequences decoded together: mlx-vlm's ``BatchGenerator`` beside one-at-a-time lanes.

A :class:`VisionDecoder` has two kinds of lane:

- **solo**: the engine's own ``generate`` (mlx-vlm's ``generate_step``, the
  prompt cache, per-request sampling and logprobs). A request that arrives
  while nothing else runs takes it, so one stream keeps its speed and its
  cache. So does a request the batch cannot take; several solo lanes are
  stepped in turn, one token each per step, so none waits for another to
  finish. A solo lane's first step is its whole prefill (mlx-vlm's
  ``generate_step`` yields nothing before it), which the other lanes wait
  for: unlike the text decoder's solo lane, it is not fed a chunk a step.
- **batch**: mlx-vlm's ``BatchGenerator`` over the language model, fed the
  request's input embeddings (the vision tower runs once, when the request is
  added) and its position state (``position_ids``, ``rope_deltas``), so rows
  with and without images decode together; greedy output equals the solo
  lane's (``tests/bridge/test_vision_batch.py``). It has one sampler for all
  rows, so a request joins it only when its sampling is the batch's (same
  temperature, top-p, min-p and top-k, and no seed, logprobs, repetition
  penalty or logit bias, which the solo lane keeps exact); its rows read and
  keep no prompt cache (``cached_tokens`` 0).

A request never moves between lanes (mlx-vlm's batch takes no KV cache in),
so the first of a burst runs solo to its end while the others batch.

mlx-vlm's language models keep a sequence's position state on the model
(Qwen2-VL's ``_rope_deltas``, its multimodal position offset, read at every
decode step of ``generate_step``). The batch passes its rows' own at every
step, but a solo lane relies on the model's, which another lane's step
overwrites: so each solo lane's state (:data:`POSITION_STATE`) is put back
on the model before its step and kept after it.

A solo lane that raises ends only its own request (a :class:`Failed`
event; the scheduler answers it with the error); a failure of the batch's
step ends every request, as in the text engine's batch.

The decoder holds mlx-vlm's wired-memory limit (Metal only) from its first
request to its close, once for every lane: lanes that entered and left it
each on their own would put back each other's limits out of order.

Engine thread only. MLX and mlx-vlm are imported lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bridge.engines.detokenizer import IncrementalDetokenizer, for_tokenizer
from bridge.engines.engine_protocol import (
    Decoded,
    Event,
    Failed,
    KvShape,
    Prepared,
    SeqId,
    ShouldAbort,
    Step,
)
from bridge.engines.mlx.memory import peak_memory
from bridge.engines.mlx.sampling import SamplerKey, sampler_key, shared_sampler
from protocol.errors import Internal, WireError

if TYPE_CHECKING:
    import mlx.nn as nn

log = logging.getLogger("bridge.engine.vision.batch")

# The attributes in which mlx-vlm's language models keep a sequence's
# positions between calls (found in mlx-vlm 0.7.10's models).
POSITION_STATE = ("_rope_deltas", "_position_ids", "_position_selector", "_rope_delta")

Generate = Callable[[Prepared, ShouldAbort], tuple[int, Generator[Step, None, None]]]
"""The solo lane: the prompt tokens the prompt cache held, and a generator
that yields steps until finished; it checks ``should_abort`` between prefill
chunks and returns early (without a last step) when it says so; closing it
stops decoding."""

Embed = Callable[[Prepared], dict[str, Any] | None]
"""A request's row arguments for mlx-vlm's batch prefill, or None if the
model cannot give them (the request then runs solo)."""


def batch_key(prepared: Prepared) -> SamplerKey | None:
    """The shared sampler a request needs of the batch, or None if only the
    solo lane serves it exactly (a seed, logprobs, a repetition penalty or a
    logit bias)."""
    s = prepared.sampling
    if s.logprobs or s.logit_bias or s.repetition_penalty:
        return None
    return sampler_key(s)


@dataclass(eq=False, slots=True)
class _Lane:
    """A solo lane: its steps, and its position state between them (None: not started)."""

    steps: Generator[Step, None, None]
    state: dict[str, Any] | None = None


@dataclass(eq=False, slots=True)
class _Row:
    seq: SeqId
    text: IncrementalDetokenizer


@dataclass(eq=False, slots=True)
class _Batch:
    """mlx-vlm's batch generator, while it has rows, and the sampler it was made with."""

    generator: Any
    key: SamplerKey
    rows: dict[int, _Row] = field(default_factory=dict)  # by uid


class VisionDecoder:
    def __init__(
        self,
        generate: Generate,
        *,
        model: nn.Module,
        processor: Any,
        tokenizer: Any,
        embed: Embed,
        capacity: int,
        prefill_step_size: int,
        prefill_batch_size: int,
        kv: KvShape,
        wired: Callable[[], AbstractContextManager[None]],
    ) -> None:
        """``generate``: the solo lane (the engine's); ``embed``: the row
        arguments of a request for mlx-vlm's batch (``inputs_embeds`` and the
        position state); ``kv``: the language model's KV cache a token, for
        the scheduler's memory admission; ``wired``: mlx-vlm's wired-memory
        limit for the model."""
        self._generate = generate
        self._kv = kv
        self._lm = getattr(model, "language_model", model)
        self._processor = processor
        self._tokenizer = tokenizer
        self._embed = embed
        self._capacity = max(1, capacity)
        self._prefill_step = prefill_step_size
        self._prefill_batch = max(1, min(prefill_batch_size, self._capacity))
        self._wired = wired
        self._held = ExitStack()
        self._holding = False
        self._solo: dict[SeqId, _Lane] = {}
        self._batch: _Batch | None = None
        self._uids: dict[SeqId, int] = {}
        self._state_names = [n for n in POSITION_STATE if hasattr(self._lm, n)]

    # -- Decoder --------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def kv(self) -> KvShape:
        return self._kv

    def add(self, seq: SeqId, prepared: Prepared, *, should_abort: ShouldAbort) -> int:
        if not self._holding:
            self._held.enter_context(self._wired())
            self._holding = True
        key = batch_key(prepared)
        busy = bool(self._solo or self._uids)
        batch = self._batch
        if busy and key is not None and (batch is None or key == batch.key):
            row_kwargs = self._embed(prepared)
            if row_kwargs is not None:
                self._to_batch(seq, prepared, key, row_kwargs)
                return 0
        cached, steps = self._generate(prepared, should_abort)
        self._solo[seq] = _Lane(steps)
        return cached

    def remove(self, seq: SeqId) -> None:
        lane = self._solo.pop(seq, None)
        if lane is not None:
            lane.steps.close()
            return
        uid = self._uids.pop(seq, None)
        if uid is not None and self._batch is not None:
            self._batch.rows.pop(uid, None)
            self._batch.generator.remove(uid)
            self._release_if_empty()

    def step(self) -> Sequence[Event]:
        events: list[Event] = []
        for seq, lane in list(self._solo.items()):
            self._enter(lane)
            try:
                step = next(lane.steps)
            except StopIteration:  # aborted in prefill: the request was cancelled
                del self._solo[seq]
                events.append(Decoded(seq=seq, step=ABORTED))
                continue
            except Exception as exc:  # this lane's own: the other lanes go on
                log.exception("vision request failed on its solo lane")
                del self._solo[seq]
                error = exc if isinstance(exc, WireError) else Internal(f"decode failed: {exc!r}")
                events.append(Failed(seq=seq, error=error))
                continue
            if step.finish_reason is not None:
                del self._solo[seq]
                lane.steps.close()
            else:
                self._leave(lane)
            events.append(Decoded(seq=seq, step=step))
        if self._batch is not None:
            events.extend(self._batch_step(self._batch))
        return events

    def peak_memory(self) -> int:
        return peak_memory()

    def lane(self, seq: SeqId) -> str | None:
        """Where ``seq`` runs: ``solo``, ``batch``, or None (not here)."""
        if seq in self._solo:
            return "solo"
        return "batch" if seq in self._uids else None

    def close(self) -> None:
        for seq in list(self._solo):
            self.remove(seq)
        self._uids.clear()
        if self._batch is not None:
            self._batch.generator.close()
            self._batch = None
        self._held.close()
        self._holding = False

    # -- the solo lanes ---------------------------------------------------------------

    def _enter(self, lane: _Lane) -> None:
        """Put ``lane``'s position state on the model (none yet: a fresh one)."""
        for name in self._state_names:
            setattr(self._lm, name, None if lane.state is None else lane.state[name])

    def _leave(self, lane: _Lane) -> None:
        lane.state = {name: getattr(self._lm, name, None) for name in self._state_names}

    # -- the batch lane ---------------------------------------------------------------

    def _to_batch(
        self, seq: SeqId, prepared: Prepared, key: SamplerKey, row_kwargs: dict[str, Any]
    ) -> None:
        if self._batch is None:
            from mlx_vlm.generate.ar import BatchGenerator

            s = prepared.sampling
            generator = BatchGenerator(
                self._lm,
                self._processor,
                sampler=shared_sampler(s) if s.temperature > 0 else None,  # None: greedy
                # mlx-vlm admits waiting rows only while a whole prefill batch fits
                # under this; the scheduler already keeps the rows within capacity
                completion_batch_size=self._capacity + self._prefill_batch - 1,
                prefill_batch_size=self._prefill_batch,
                prefill_step_size=self._prefill_step,
                compute_logprobs=False,
            )
            self._batch = _Batch(generator, key)
        (uid,) = self._batch.generator.insert(
            [list(prepared.tokens)],
            max_tokens=[prepared.sampling.max_tokens],
            prompt_kwargs=[row_kwargs],
        )
        self._batch.rows[uid] = _Row(seq=seq, text=for_tokenizer(self._tokenizer))
        self._uids[seq] = uid

    def _batch_step(self, batch: _Batch) -> list[Event]:
        """One step of mlx-vlm's batch (it ends rows at EOS, ``stop``, and at
        their ``max_tokens``, ``length``, and lets them go itself)."""
        _, responses = batch.generator.next()
        events: list[Event] = []
        for r in responses:
            row = batch.rows.get(r.uid)
            if row is None:
                continue
            finish = r.finish_reason
            eos = finish == "stop"
            piece = "" if eos else row.text.add(int(r.token))
            if finish is not None:
                piece += row.text.finish()
                del batch.rows[r.uid]
                self._uids.pop(row.seq, None)
            step = Step(text=piece, token_id=int(r.token), is_eos=eos, finish_reason=finish)
            events.append(Decoded(seq=row.seq, step=step))
        self._release_if_empty()
        return events

    def _release_if_empty(self) -> None:
        """An empty batch is let go, so that the next one may take another sampler."""
        if self._batch is not None and not self._batch.rows:
            self._batch.generator.close()
            self._batch = None


# What a generator that stopped without a last step ended with.
ABORTED = Step(text="", token_id=-1, is_eos=True, finish_reason="cancelled")
