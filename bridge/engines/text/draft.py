"""The draft model of speculative decoding: ``load``'s ``draft_path``.

A draft is a small model that proposes the next few tokens for the model
to check in one forward pass (mlx-lm's ``speculative_generate_step``). It
must speak the same tokenizer: token ids are compared, not text, so a draft
whose vocabulary differs in one entry would propose wrong tokens. The
vocabularies (every token and its id) are compared at load, and a mismatch
is ``load_failed`` naming the first difference.

Engine thread only; mlx-lm is imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bridge.model_dir.files import ModelFiles
from bridge.model_dir.remote_code import CodeGuard
from protocol.errors import LoadFailed, RequestId, WireError

if TYPE_CHECKING:
    import mlx.nn as nn
    from mlx_lm.tokenizer_utils import TokenizerWrapper

# Draft tokens proposed per step when a request does not say (mlx-lm's server uses 3).
DEFAULT_DRAFT_TOKENS = 3


def load_draft(
    files: ModelFiles,
    tokenizer: TokenizerWrapper,
    *,
    trust_remote_code: bool,
    request_id: RequestId | None,
) -> nn.Module:
    """The draft's weights, read; ``load_failed`` if it cannot be the model's draft."""
    import mlx.core as mx
    import mlx_lm

    directory = files.directory
    try:
        with CodeGuard(directory, allowed=trust_remote_code, request_id=request_id):
            loaded: Any = mlx_lm.load(
                str(directory),
                tokenizer_config={"trust_remote_code": trust_remote_code},
                trust_remote_code=trust_remote_code,
                lazy=True,
            )
            draft, draft_tokenizer = loaded[0], loaded[1]
            mx.eval(draft.parameters())
    except WireError:
        raise
    except Exception as exc:
        raise LoadFailed(
            f"draft_path: {directory}: {type(exc).__name__}: {exc}", request_id=request_id
        ) from None
    problem = vocabulary_difference(tokenizer, draft_tokenizer)
    if problem is not None:
        raise LoadFailed(
            f"draft_path: the draft's tokenizer is not the model's ({problem}); a draft "
            "must share the model's vocabulary",
            request_id=request_id,
        )
    if not hasattr(draft, "layers"):
        raise LoadFailed("draft_path: the draft model has no layers", request_id=request_id)
    return draft


def vocabulary_difference(model: Any, draft: Any) -> str | None:
    """None when both tokenizers map the same tokens to the same ids, else the first difference."""
    mine, theirs = _vocabulary(model), _vocabulary(draft)
    if len(mine) != len(theirs):
        return f"{len(theirs)} tokens against the model's {len(mine)}"
    for token, index in mine.items():
        other = theirs.get(token)
        if other != index:
            return f"token {token!r} is id {other} in the draft, {index} in the model"
    model_eos = set(getattr(model, "eos_token_ids", ()) or ())
    draft_eos = set(getattr(draft, "eos_token_ids", ()) or ())
    if model_eos and draft_eos and not model_eos & draft_eos:
        return f"end-of-sequence ids {sorted(draft_eos)} against the model's {sorted(model_eos)}"
    return None


def _vocabulary(tokenizer: Any) -> dict[str, int]:
    backend = getattr(tokenizer, "_tokenizer", tokenizer)
    vocab = backend.get_vocab()
    return dict(vocab)
