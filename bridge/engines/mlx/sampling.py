"""A request's sampling on MLX, done the same way by the mlx-lm and the mlx-vlm engine.

MLX does not check token ids against the vocabulary (an id out of range
corrupts memory), so ``fit_vocab`` and ``check_token_ids`` do, with an error
that names the field. ``make_sampling`` turns :class:`~protocol.requests.Sampling`
into mlx-lm's sampler and logits processors (mlx-vlm samples with mlx-lm's
too), and ``step_logprobs`` reports one step's log-probabilities.

MLX and mlx-lm are imported lazily, on the engine thread.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from protocol.errors import InvalidRequest
from protocol.replies import TopLogprob
from protocol.requests import Detokenize, GenerationRequest, Sampling

__all__ = ["check_token_ids", "fit_vocab", "make_sampling", "step_logprobs"]


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


def make_sampling(s: Sampling) -> tuple[Any, list[Any]]:
    """mlx-lm's sampler and logits processors for ``s``, after seeding MLX's
    generator when ``s`` names a seed."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    if s.seed is not None:
        mx.random.seed(s.seed)
    sampler = make_sampler(temp=s.temperature, top_p=s.top_p, min_p=s.min_p, top_k=s.top_k)
    processors = make_logits_processors(
        logit_bias=dict(s.logit_bias) or None,
        repetition_penalty=s.repetition_penalty,
        repetition_context_size=s.repetition_context_size,
    )
    return sampler, processors


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
