"""A request's sampling on MLX, done the same way by the mlx-lm and the mlx-vlm engine.

MLX does not check token ids against the vocabulary (an id out of range
corrupts memory), so ``fit_vocab`` and ``check_token_ids`` do, with an error
that names the field. ``make_sequence_sampling`` turns
:class:`~protocol.requests.Sampling` into mlx-lm's sampler and logits
processors for one sequence (mlx-vlm samples with mlx-lm's too), and
``step_logprobs`` reports one step's log-probabilities.

No request touches MLX's global generator: a seeded request draws from its
own keys (:class:`SeededSampler`), so that requests decoded together never
change each other's tokens.

MLX and mlx-lm are imported lazily, on the engine thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from protocol.errors import InvalidRequest
from protocol.replies import TopLogprob
from protocol.requests import Detokenize, GenerationRequest, Sampling

__all__ = [
    "SeededSampler",
    "SequenceSampling",
    "check_token_ids",
    "fit_vocab",
    "make_sequence_sampling",
    "step_logprobs",
]


def fit_vocab(request: GenerationRequest, vocab: int) -> Sampling:
    """Check token ids against the model's vocabulary (MLX does not: an id out
    of range corrupts memory); a ``top_k`` past the vocabulary means no top-k."""
    s = request.sampling
    for token, _ in s.logit_bias:
        if token >= vocab:
            raise InvalidRequest(
                f"logit_bias[{str(token)!r}]: token id is outside the vocabulary (size {vocab})",
                request_id=request.id,
            )
    return replace(s, top_k=0) if s.top_k >= vocab else s


def check_token_ids(request: Detokenize, vocab: int) -> None:
    """Refuse a ``detokenize`` whose token ids lie outside the vocabulary."""
    for i, token in enumerate(request.tokens):
        if token >= vocab:
            raise InvalidRequest(
                f"tokens[{i}]: {token} is outside the vocabulary (size {vocab})",
                request_id=request.id,
            )


def step_logprobs(
    logprobs: Any, token: int, top_n: int, tokenizer: Any
) -> tuple[float | None, tuple[TopLogprob, ...] | None]:
    """The sampled ``token``'s log-probability and the ``top_n`` most likely
    tokens, best first; ``(None, None)`` when ``top_n`` is 0."""
    if top_n <= 0:
        return None, None
    import mlx.core as mx

    order = mx.argpartition(-logprobs, kth=top_n - 1)[:top_n]
    ids: list[int] = order.tolist()  # type: ignore[assignment]
    lps: list[float] = logprobs[order].tolist()
    ranked = sorted(zip(ids, lps, strict=True), key=lambda p: -p[1])
    top = tuple(
        TopLogprob(token_id=int(t), token=str(tokenizer.decode([int(t)])), logprob=float(v))
        for t, v in ranked
    )
    return float(logprobs[token].item()), top


@dataclass(eq=False, slots=True)
class SequenceSampling:
    """One sequence's sampler and logits processors, for either decoding lane.

    ``sampler`` is shared with every other sequence of the same options when
    it draws from MLX's global generator (so that ``BatchGenerator`` samples
    those rows in one call); a seeded request gets its own
    :class:`SeededSampler`. ``at`` tells a seeded sampler where the sequence
    is, when it moves between lanes.
    """

    sampler: Any
    processors: list[Any]
    seeded: SeededSampler | None = None
    context: int = 0  # prompt tokens the processors look back over
    # an output grammar's processor (bridge.engines.constraints), applied last
    constraint: Any = None

    def at(self, position: int) -> None:
        if self.seeded is not None:
            self.seeded.position = position

    def processors_after(self, history: Sequence[int]) -> list[Any]:
        """The processors, seeing ``history`` (tokens already in the cache)
        before the tokens ``generate_step`` passes them."""
        out = list(self.processors)
        if out and history and self.context:
            import mlx.core as mx

            past = mx.array(list(history[-self.context :]))
            out = [_with_history(p, past) for p in out]
        if self.constraint is not None:
            self.constraint.offset = len(history)
            out.append(self.constraint)
        return out

    def batch_processors(self) -> list[Any]:
        """The processors for ``BatchGenerator``, which passes every token of the sequence."""
        if self.constraint is None:
            return self.processors
        self.constraint.offset = 0
        return [*self.processors, self.constraint]


class SeededSampler:
    """A sampler with its own PRNG keys: the *n*-th token a sequence samples
    uses key *n* of its seed, whatever else shares the batch or the process.

    mlx-lm's samplers draw from MLX's global generator (``mx.random.seed``
    is process-wide), so two seeded requests decoded together would change
    each other's tokens. This one applies mlx-lm's own filters (top-p, min-p,
    top-k) and draws with ``mx.random.categorical(..., key=…)``.
    """

    def __init__(self, s: Sampling, seed: int) -> None:
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        filters: list[Any] = []
        if 0 < s.top_p < 1.0:
            filters.append(lambda x: apply_top_p(x, s.top_p))
        if s.min_p != 0.0:
            filters.append(lambda x: apply_min_p(x, s.min_p, 1))
        if s.top_k > 0:
            filters.append(lambda x: apply_top_k(x, s.top_k))
        self._filters = filters
        self._scale = 1.0 / s.temperature
        # one key per token, and one for each lane's token computed ahead
        self._keys = mx.random.split(mx.random.key(seed), s.max_tokens + 2)
        self.position = 0

    def __call__(self, logprobs: Any) -> Any:
        import mlx.core as mx

        for f in self._filters:
            logprobs = f(logprobs)
        key = self._keys[min(self.position, self._keys.shape[0] - 1)]
        self.position += 1
        return mx.random.categorical(logprobs * self._scale, key=key)


def make_sequence_sampling(s: Sampling) -> SequenceSampling:
    from mlx_lm.sample_utils import make_logits_processors

    processors = make_logits_processors(
        logit_bias=dict(s.logit_bias) or None,
        repetition_penalty=s.repetition_penalty,
        repetition_context_size=s.repetition_context_size,
    )
    context = s.repetition_context_size if s.repetition_penalty else 0
    if s.temperature > 0 and s.seed is not None:
        seeded = SeededSampler(s, s.seed)
        return SequenceSampling(
            sampler=seeded, processors=processors, seeded=seeded, context=context
        )
    return SequenceSampling(sampler=shared_sampler(s), processors=processors, context=context)


SamplerKey = tuple[float, float, float, int]
_SHARED: dict[SamplerKey, Any] = {}


def sampler_key(s: Sampling) -> SamplerKey | None:
    """The options that sequences sampled by one shared sampler agree on
    (greedy is greedy whatever the filters), or None for a seeded request,
    which draws its own keys."""
    if s.temperature <= 0:
        return (0.0, 1.0, 0.0, 0)
    if s.seed is not None:
        return None
    return (s.temperature, s.top_p, s.min_p, s.top_k)


def shared_sampler(s: Sampling) -> Any:
    """mlx-lm's sampler for ``s``'s options (not seeded), one object per
    :func:`sampler_key` (a batch samples rows that share a sampler object in
    one call)."""
    from mlx_lm.sample_utils import make_sampler

    key = sampler_key(s)
    assert key is not None, "a seeded request has its own sampler"
    temperature, top_p, min_p, top_k = key
    sampler = _SHARED.get(key)
    if sampler is None:
        if len(_SHARED) >= 64:
            _SHARED.clear()
        sampler = _SHARED[key] = make_sampler(
            temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k
        )
    return sampler


def _with_history(processor: Any, history: Any) -> Any:
    """``processor`` seeing ``history`` (tokens already in the cache) before
    the tokens ``generate_step`` passes it, as it would have without the cache."""
    import mlx.core as mx

    def call(tokens: Any, logits: Any) -> Any:
        return processor(mx.concatenate([history, tokens]), logits)

    return call
