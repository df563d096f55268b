"""Many sequences of one mlx-lm model decoded together, and one alone on ``generate_step``.

mlx-lm's ``BatchGenerator`` decodes a batch (left-padded ``BatchKVCache``,
per-row samplers and logits processors, chunked prefill interleaved with
decode steps), but with one sequence it decodes at two thirds of
``generate_step``'s speed (its per-step bookkeeping is made for many rows).
So a :class:`TextDecoder` has two lanes and moves sequences between them:

- **solo**: exactly one sequence, on mlx-lm's ``generate_step``, its prompt
  prefilled here one chunk per ``step`` (the same model calls
  ``generate_step`` makes, so that a second request is admitted between two
  chunks instead of after the whole prompt);
- **batch**: two or more, on ``BatchGenerator``.

A move never changes a sequence's tokens. Both lanes compute one token
ahead, and when token *k* has been handed out the sequence's KV cache holds
every token up to and including *k*. A move closes the old lane, trims the
cache to the tokens before *k* and feeds what it does not hold again in the
new lane (token *k*; after speculative decoding, whose cache may hold one
token fewer, the one before it too), which then computes token *k + 1* as
the old lane had (greedy output is identical:
``tests/bridge/test_batching.py``). A seeded sampler draws its key by token
position (:mod:`bridge.engines.mlx.sampling`), so it is told where the
sequence is.

A model whose KV cache cannot be trimmed (recurrent layers keep a state,
not a list of positions) cannot be moved between the lanes without changing
its tokens: it decodes one sequence at a time (capacity 1), on the solo lane.

Prompt caches come from and go back to the engine's
:class:`~bridge.engines.text.prompt_cache.PromptCacheStore`: a sequence takes
its slot when added (the cache goes into ``insert(caches=…)``) and puts the
cache back when it ends, however it ends (from the finishing response, or
``remove(…, return_prompt_caches=True)``).

An output grammar's processor masks a row itself on the solo lane and for
the row's first step in the batch; after that the batch's one mask does
(:mod:`bridge.engines.text.batch_mask`, through the model the
``BatchGenerator`` calls).

Engine thread only. MLX and mlx-lm are imported lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from bridge.engines.detokenizer import IncrementalDetokenizer, for_tokenizer
from bridge.engines.engine_protocol import (
    Decoded,
    Event,
    KvShape,
    Prefilled,
    Prepared,
    SeqId,
    ShouldAbort,
    Step,
)
from bridge.engines.mlx.memory import peak_memory
from bridge.engines.mlx.sampling import SequenceSampling, make_sequence_sampling, step_logprobs
from bridge.engines.text.batch_mask import BatchMasks, MaskedModel
from bridge.engines.text.prompt_cache import KVCache, PromptCacheStore

if TYPE_CHECKING:
    import mlx.nn as nn
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger("bridge.engine.decoder")


@dataclass(eq=False, slots=True)
class _Seq:
    """One sequence's engine-side state, whichever lane it is in."""

    prepared: Prepared
    cache_key: str | None
    sampling: SequenceSampling
    text: IncrementalDetokenizer
    emitted: int = 0
    last_token: int = -1
    # -- solo lane only --
    cache: KVCache | None = None
    fed: list[int] = field(default_factory=list)  # the tokens ``cache`` holds, in order
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet fed
    total: int = 0  # prompt tokens to feed (cached ones excluded)
    # prompt tokens the solo lane had prefilled before a move to the batch,
    # which counts only what it is given: its progress is offset by these
    base: int = 0
    steps: Any = None  # generate_step's (or speculative_generate_step's) iterator once decoding
    # -- batch lane only --
    uid: int | None = None

    @property
    def remaining(self) -> int:
        return self.prepared.sampling.max_tokens - self.emitted


class TextDecoder:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: TokenizerWrapper,
        *,
        caches: PromptCacheStore,
        capacity: int,
        prefill_step_size: int,
        prefill_batch_size: int,
        max_kv_size: int | None,
        kv: KvShape,
        draft: nn.Module | None = None,
    ) -> None:
        """``draft``: a draft model, for the solo lane's speculative decoding."""
        self._model = model
        self._draft = draft
        self._tokenizer = tokenizer
        self._caches = caches
        # Moving a sequence between the lanes trims its KV cache by one token;
        # a model whose cache cannot be trimmed (recurrent layers' states)
        # decodes one sequence at a time instead of giving wrong tokens.
        self._movable = _trimmable(self._new_cache_of(model, max_kv_size))
        self._capacity = max(1, capacity) if self._movable else 1
        self._prefill_step = prefill_step_size
        self._prefill_batch = max(1, min(prefill_batch_size, self._capacity))
        self._max_kv_size = max_kv_size
        self._kv = kv
        self._eos = frozenset(tokenizer.eos_token_ids)
        self._seqs: dict[SeqId, _Seq] = {}
        self._solo: SeqId | None = None
        self._batch: BatchGenerator | None = None
        self._by_uid: dict[int, SeqId] = {}
        self._masks = BatchMasks(lambda: self._batch)

    # -- Decoder --------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def kv(self) -> KvShape:
        return self._kv

    @property
    def batch_masks(self) -> BatchMasks:
        """The decode batch's output-grammar mask (bridge.engines.text.batch_mask)."""
        return self._masks

    def add(self, seq: SeqId, prepared: Prepared, *, should_abort: ShouldAbort) -> int:
        prompt = prepared.tokens
        key = prepared.cache_key
        reuse = self._caches.take(key, prompt)
        state = _Seq(
            prepared=prepared,
            cache_key=key,
            sampling=make_sequence_sampling(prepared.sampling),
            text=for_tokenizer(self._tokenizer),
        )
        if prepared.constraint is not None:
            state.sampling.constraint = prepared.constraint.processor(len(prompt))
        cache = reuse.cache if reuse.cache is not None else self._new_cache()
        state.cache = cache
        state.fed = list(prompt[: reuse.cached])
        state.pending = list(prompt[reuse.cached :])
        state.total = len(state.pending)
        self._seqs[seq] = state
        if not self._seqs.keys() - {seq}:
            self._solo = seq
        else:
            if self._solo is not None:
                self._to_batch(self._solo)
            self._to_batch(seq)
        return reuse.cached

    def remove(self, seq: SeqId) -> None:
        state = self._seqs.pop(seq, None)
        if state is None:
            return
        if self._solo == seq:
            self._solo = None
            self._close_solo(state)
            self._keep(state, state.fed, state.cache)
        elif state.uid is not None and self._batch is not None:
            self._by_uid.pop(state.uid, None)
            self._masks.drop(state.uid, state.sampling.constraint)
            found = self._batch.remove([state.uid], return_prompt_caches=True)
            cache, tokens = found.get(state.uid, (None, None))
            if cache is not None and tokens is not None:
                self._keep(state, tokens, cache)

    def step(self) -> Sequence[Event]:
        if self._solo is not None:
            return self._solo_step(self._solo)
        if self._batch is not None and self._by_uid:
            events = self._batch_step()
            self._maybe_solo()
            return events
        return ()

    def peak_memory(self) -> int:
        return peak_memory()

    def close(self) -> None:
        for seq in list(self._seqs):
            self.remove(seq)
        if self._batch is not None:
            self._batch.close()
            self._batch = None

    # -- the solo lane ----------------------------------------------------------------

    def _solo_step(self, seq: SeqId) -> Sequence[Event]:
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        state = self._seqs[seq]
        if state.steps is None and len(state.pending) > 1:
            # one prefill chunk, as generate_step would feed it
            n = min(self._prefill_step, len(state.pending) - 1)
            chunk, state.pending = state.pending[:n], state.pending[n:]
            with mx.stream(generation_stream):
                self._model(mx.array(chunk)[None], cache=state.cache)
                mx.eval([c.state for c in state.cache or ()])
            state.fed.extend(chunk)
            mx.clear_cache()
            return (Prefilled(seq=seq, done=state.total - len(state.pending), total=state.total),)
        if state.steps is None:
            state.steps = self._start_steps(state, state.pending)
            state.fed.extend(state.pending)
            state.pending = []
        token, logprobs, from_draft = next(state.steps)
        events: list[Event] = []
        if state.emitted == 0 and state.total > 0:
            events.append(Prefilled(seq=seq, done=state.total, total=state.total))
        state.fed.append(token)
        finish = "stop" if token in self._eos else None
        if finish is None and state.remaining <= 1:
            finish = "length"
        step = self._step(state, token, logprobs, finish)
        if from_draft:
            step = replace(step, from_draft=True)
        events.append(Decoded(seq=seq, step=step))
        if finish is not None:
            self._seqs.pop(seq, None)
            self._solo = None
            self._close_solo(state)
            self._keep(state, state.fed, state.cache)
        return events

    def _start_steps(self, state: _Seq, feed: list[int]) -> Any:
        """generate_step over ``state.cache`` (which holds ``state.fed``), fed
        ``feed``; speculative_generate_step when the request drafts. Yields
        (token, logprobs, whether the draft proposed it)."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        sampling = state.sampling
        sampling.at(state.emitted)
        processors = sampling.processors_after(state.fed) or None
        drafts = state.prepared.draft_tokens or 0
        if self._draft is not None and drafts > 0:  # never with a grammar (engine.prepare)
            return self._speculate(state, feed, drafts, processors)
        steps = generate_step(
            mx.array(feed),
            self._model,
            max_tokens=state.remaining,
            sampler=sampling.sampler,
            logits_processors=processors,
            prompt_cache=state.cache,
            prefill_step_size=self._prefill_step,
        )
        return ((token, logprobs, False) for token, logprobs in steps)

    def _speculate(self, state: _Seq, feed: list[int], drafts: int, processors: Any) -> Any:
        """speculative_generate_step: the draft's own cache is filled with the
        tokens the model's cache already holds, then both are fed ``feed``."""
        import mlx.core as mx
        from mlx_lm.generate import generation_stream, speculative_generate_step

        draft = self._draft
        assert draft is not None and state.cache is not None
        draft_cache = self._new_cache_of(draft, self._max_kv_size)
        held = list(state.fed)
        with mx.stream(generation_stream):
            for start in range(0, len(held), self._prefill_step):
                draft(mx.array(held[start : start + self._prefill_step])[None], cache=draft_cache)
                mx.eval([c.state for c in draft_cache])
        return speculative_generate_step(
            mx.array(feed),
            self._model,
            draft,
            num_draft_tokens=drafts,
            max_tokens=state.remaining,
            sampler=state.sampling.sampler,
            logits_processors=processors,
            prompt_cache=[*state.cache, *draft_cache],
            prefill_step_size=self._prefill_step,
        )

    def _close_solo(self, state: _Seq) -> None:
        if state.steps is not None:
            state.steps.close()
            state.steps = None

    # -- the batch lane ---------------------------------------------------------------

    def _generator(self) -> BatchGenerator:
        if self._batch is None:
            from mlx_lm.generate import BatchGenerator

            self._batch = BatchGenerator(
                MaskedModel(self._model, self._masks),
                stop_tokens=[[t] for t in sorted(self._eos)],
                completion_batch_size=self._capacity,
                prefill_batch_size=self._prefill_batch,
                prefill_step_size=self._prefill_step,
                max_kv_size=self._max_kv_size,
            )
        return self._batch

    def _to_batch(self, seq: SeqId) -> None:
        """Move ``seq`` (new, or the solo lane's) into the batch."""

        state = self._seqs[seq]
        if self._solo == seq:
            self._solo = None
        if state.steps is not None:  # decoding: feed the last token again (module docstring)
            self._close_solo(state)
            assert state.cache is not None
            held = _aligned(state.cache, len(state.fed) - 1)
            prompt, history = state.fed[held:], state.fed[:held]
        else:
            prompt, history = state.pending, state.fed
            state.base = state.total - len(state.pending)
        sampling = state.sampling
        sampling.at(state.emitted)
        (uid,) = self._generator().insert(
            [prompt],
            max_tokens=[state.remaining],
            caches=[state.cache],
            all_tokens=[list(history)],
            samplers=[sampling.sampler],
            logits_processors=[sampling.batch_processors()],
        )
        state.uid = uid
        state.cache = None
        state.fed = []
        state.pending = []
        self._by_uid[uid] = seq
        if sampling.constraint is not None:
            self._masks.enlist(uid, sampling.constraint)

    def _maybe_solo(self) -> None:
        """One sequence left in the batch, decoding: give it the solo lane."""
        if len(self._by_uid) != 1 or self._batch is None:
            return
        ((uid, seq),) = self._by_uid.items()
        state = self._seqs[seq]
        if state.emitted == 0:
            return  # still prefilling: it finishes its prompt in the batch
        from mlx_lm.models.cache import trim_prompt_cache

        found = self._batch.remove([uid], return_prompt_caches=True)
        del self._by_uid[uid]
        self._masks.drop(uid, state.sampling.constraint)
        cache, tokens = found[uid]
        trim_prompt_cache(cache, 1)
        state.uid = None
        state.cache = cache
        state.fed = list(tokens[:-1])
        state.steps = self._start_steps(state, [state.last_token])
        state.fed.append(state.last_token)
        self._solo = seq

    def _batch_step(self) -> list[Event]:
        assert self._batch is not None
        prompt_responses, responses = self._batch.next()
        events: list[Event] = []
        by_uid = self._by_uid
        for p in prompt_responses:
            seq = by_uid.get(p.uid)
            if seq is not None:
                done, total = p.progress
                base = self._seqs[seq].base
                events.append(Prefilled(seq=seq, done=base + int(done), total=base + int(total)))
        for r in responses:
            seq = by_uid.get(r.uid)
            if seq is None:
                continue
            state = self._seqs[seq]
            finish = r.finish_reason
            events.append(Decoded(seq=seq, step=self._step(state, r.token, r.logprobs, finish)))
            if finish is not None:
                del by_uid[r.uid]
                self._masks.drop(r.uid, state.sampling.constraint)
                self._seqs.pop(seq, None)
                if r.prompt_cache is not None and r.all_tokens is not None:
                    self._keep(state, r.all_tokens, r.prompt_cache)
        return events

    # -- both lanes -------------------------------------------------------------------

    def _step(self, state: _Seq, token: int, logprobs: Any, finish: str | None) -> Step:
        state.emitted += 1
        state.last_token = token
        is_eos = finish == "stop" and token in self._eos
        piece = "" if is_eos else state.text.add(token)
        if finish is not None:
            piece += state.text.finish()
        n = state.prepared.sampling.logprobs
        if n:
            logprob, top = step_logprobs(logprobs, token, n, self._tokenizer)
            return Step(
                text=piece,
                token_id=token,
                is_eos=is_eos,
                finish_reason=finish,
                logprob=logprob,
                top_logprobs=top,
            )
        return Step(text=piece, token_id=token, is_eos=is_eos, finish_reason=finish)

    @staticmethod
    def _new_cache_of(model: nn.Module, max_kv_size: int | None) -> KVCache:
        from mlx_lm.models.cache import make_prompt_cache

        cache: KVCache = make_prompt_cache(model, max_kv_size=max_kv_size)
        return cache

    def _new_cache(self) -> KVCache:
        return self._new_cache_of(self._model, self._max_kv_size)

    def _keep(self, state: _Seq, tokens: Sequence[int], cache: KVCache | None) -> None:
        if cache is None:
            return
        try:
            self._caches.put(state.cache_key, tokens, cache)
        except Exception:  # losing a warm cache must not fail the request
            log.exception("prompt cache: could not keep slot %r", state.cache_key)


def _aligned(cache: KVCache, tokens: int) -> int:
    """Trim ``cache`` to at most ``tokens`` positions; how many it holds then
    (for a lane move: the prompt cache's ``put`` aligns what it keeps itself).

    One lane computes a token ahead, so its cache holds one more than was
    handed out; a speculative lane ends with a correction token it has not
    fed yet, so its cache may hold one fewer."""
    from mlx_lm.models.cache import trim_prompt_cache

    held = int(getattr(cache[0], "offset", tokens)) if cache else tokens
    if held > tokens:
        trim_prompt_cache(cache, held - tokens)
        held = tokens
    return held


def _trimmable(cache: KVCache) -> bool:
    from mlx_lm.models.cache import can_trim_prompt_cache

    return bool(can_trim_prompt_cache(cache))
