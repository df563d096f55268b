"""The real engine: mlx-lm models, run on the scheduler's one engine thread.

MLX, mlx-lm and psutil are imported lazily (``warm_up`` runs on the engine
thread right after start-up), so ``python -m bridge`` answers ``hello``
before MLX has finished importing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from bridge.engines.constraints import Compiled, Grammars
from bridge.engines.context_limits import DEFAULT_MAX_PROMPT_TOKENS, ContextLimits, chat_chars
from bridge.engines.engine_protocol import (
    DEFAULT_MAX_CONCURRENCY,
    KvShape,
    LoadStep,
    Prepared,
    ReportLoad,
    no_report,
)
from bridge.engines.mlx.facts import model_facts
from bridge.engines.mlx.install import mlx_problem, require_mlx
from bridge.engines.mlx.memory import (
    available_memory,
    clear_streams,
    free_cache,
    kv_budget,
    memory_stats,
)
from bridge.engines.mlx.sampling import check_token_ids, fit_vocab
from bridge.engines.prompt_tokens import encode_prompt
from bridge.engines.text.decoder import TextDecoder
from bridge.engines.text.draft import DEFAULT_DRAFT_TOKENS, load_draft
from bridge.engines.text.loading import LoadPlan, WeightsLoader, WholeModel
from bridge.engines.text.prompt_cache import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    PromptCacheStore,
)
from bridge.engines.tool_calls import (
    answer_parser,
    offered_tools,
    required_call,
    template_fields,
    tool_format_for,
)
from bridge.model_dir.config import kv_cache_bytes
from bridge.model_dir.files import Footprint, ModelFiles, check_fits, open_model
from bridge.model_dir.remote_code import CodeGuard, remote_code_allowed
from protocol.errors import (
    InvalidRequest,
    LoadFailed,
    NoModel,
    RequestId,
    VisionNotSupported,
    WireError,
)
from protocol.fields import JsonValue
from protocol.replies import AttentionFacts, MemoryStats, ModelFacts
from protocol.requests import (
    Chat,
    ChatMessage,
    Detokenize,
    Generate,
    GenerationRequest,
    Inspect,
    Load,
    OutputConstraint,
    Sampling,
    TextPart,
    Tokenize,
)

if TYPE_CHECKING:
    import mlx.nn as nn
    from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger("bridge.engine")

# Prompt tokens per prefill chunk. One chunk runs between two decode steps
# of the batch, so this bounds both how long the other streams stall while a
# prompt is admitted and how long a cancel waits during prefill (see
# docs/benchmarks.md for the measurements behind it).
DEFAULT_PREFILL_STEP = 512
# New sequences prefilled together in one chunk (mlx-lm's default is 8).
DEFAULT_PREFILL_BATCH = 8
# Share of the free memory after a load that KV caches may take in all, when
# no --memory-budget is given (the rest is for activations and MLX's buffers).
KV_SHARE = 0.8


@dataclass(slots=True)
class _Loaded:
    model: nn.Module
    tokenizer: TokenizerWrapper
    facts: ModelFacts
    weights_bytes: int
    max_kv_size: int | None
    kv: KvShape
    grammars: Grammars
    draft: nn.Module | None = None


class MlxLmEngine:
    def __init__(
        self,
        *,
        prefill_step_size: int = DEFAULT_PREFILL_STEP,
        memory_budget: int | None = None,
        prompt_cache_entries: int = DEFAULT_MAX_ENTRIES,
        prompt_cache_bytes: int = DEFAULT_MAX_BYTES,
        trust_remote_code: bool = False,
        max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        prefill_batch_size: int = DEFAULT_PREFILL_BATCH,
        loader: WeightsLoader | None = None,
    ) -> None:
        """``loader`` reads the weights (default: the whole model, here)."""
        self._loader: WeightsLoader = loader or WholeModel()
        self._prefill_step_size = prefill_step_size
        self._max_concurrency = max_concurrency
        self._prefill_batch_size = prefill_batch_size
        self._trust_remote_code = trust_remote_code  # --trust-remote-code
        self._max_prompt_tokens = max_prompt_tokens
        self._memory_budget = memory_budget
        self._loaded: _Loaded | None = None
        self._caches = PromptCacheStore(
            max_entries=prompt_cache_entries, max_bytes=prompt_cache_bytes
        )

    @property
    def loader(self) -> WeightsLoader:
        return self._loader

    # -- engine thread ---------------------------------------------------------------

    def warm_up(self) -> None:
        mlx_problem()  # imports MLX and mlx-lm, or logs one line saying what to install

    def load(self, request: Load, report: ReportLoad | None = None) -> ModelFacts:
        require_mlx(request.id)
        remote_code_allowed(request, worker_allows=self._trust_remote_code)  # before any read
        files = open_model(request.path, request.adapter_path)
        return self.load_checked(request, files, report)

    def load_checked(
        self, request: Load, files: ModelFiles, report: ReportLoad | None = None
    ) -> ModelFacts:
        say = report or no_report
        trust = remote_code_allowed(request, worker_allows=self._trust_remote_code)
        directory = files.directory
        parts = self._loader.parts
        if files.draft is not None and parts > 1:
            raise LoadFailed(
                "draft_path: a sharded worker runs no draft model", request_id=request.id
            )
        needed = -(-files.weights_bytes // parts)  # this process's share
        adapter = str(files.adapter) if files.adapter is not None else None
        check_fits(
            _share(files.footprint(request.context_len), parts),
            self._available_memory(),
            force=request.force,
        )
        say(LoadStep(step="checking"))
        self.unload()
        plan = LoadPlan(
            directory=directory,
            adapter=adapter,
            trust_remote_code=trust,
            weights_bytes=needed,
            context_len=request.context_len,
        )
        try:
            with CodeGuard(directory, allowed=trust, request_id=request.id):
                model, tokenizer, config = self._loader.load(plan, say)
        except WireError:  # load_failed, or a sharded rank's rank_failed
            raise
        except Exception as exc:
            raise LoadFailed(f"{request.path}: {type(exc).__name__}: {exc}") from None
        facts = model_facts(model, config, path=str(directory), context_len=request.context_len)
        draft = None
        if files.draft is not None:
            draft = load_draft(
                files.draft, tokenizer, trust_remote_code=trust, request_id=request.id
            )
            facts = replace(facts, draft=str(files.draft.directory))
            needed += files.draft.weights_bytes  # the draft's weights are this process's too
        # after the draft is in memory: the KV caches get what is left beside both
        kv = KvShape(
            bytes_per_token=-(-kv_cache_bytes(files.config, files.weights, 1) // parts),
            budget=kv_budget(self._memory_budget, weights=needed, share=KV_SHARE),
        )
        grammars = Grammars(tokenizer, facts.vocab_size)
        self._loaded = _Loaded(
            model, tokenizer, facts, needed, request.context_len, kv, grammars, draft
        )
        say(LoadStep(step="ready"))
        log.info("loaded %s (%s, %d layers)", directory, facts.model_type, facts.layers)
        return facts

    def unload(self) -> bool:
        self._caches.clear()  # KV caches belong to the model: never reuse them across loads
        if self._loaded is None:
            return False
        self._loaded = None
        free_cache()
        return True

    def prepare(self, request: GenerationRequest) -> Prepared:
        loaded = self._require(request)
        tokenizer = loaded.tokenizer
        limits = ContextLimits(
            context_len=loaded.facts.context_len, max_prompt_tokens=self._max_prompt_tokens
        )
        sampling = fit_vocab(request, loaded.facts.vocab_size)
        tool_format = None
        tools = None
        output = request.constraint
        match request:
            case Generate():
                field_name = "prompt"
                tokens = limits.encode(
                    partial(encode_prompt, tokenizer),
                    request.prompt,
                    field=field_name,
                    sampling=sampling,
                    request_id=request.id,
                )
            case Chat():
                field_name = "messages"
                tools = offered_tools(request)
                tokens = self._chat_tokens(tokenizer, request, tools, limits, sampling)
                tool_format = tool_format_for(tokenizer, tools)
                specials = partial(_specials, tokenizer)
                output = required_call(request, tool_format, specials) or output
        if not tokens:
            raise InvalidRequest("prompt: encodes to zero tokens", request_id=request.id)
        sampling = limits.check(
            len(tokens), field=field_name, sampling=sampling, request_id=request.id
        )
        drafts: int | None = None
        if loaded.draft is not None:
            asked = request.sampling.num_draft_tokens
            drafts = DEFAULT_DRAFT_TOKENS if asked is None else asked
            if output is not None:
                drafts = 0  # the grammar's matcher takes one token a step
        return Prepared(
            draft_tokens=drafts,
            tokens=tuple(tokens),
            sampling=sampling,
            cache_key=request.cache_key,
            answer_parser=answer_parser(tool_format, tools),
            output=output,
            constraint=self.compile_constraint(output, request.id) if output else None,
        )

    def compile_constraint(
        self, output: OutputConstraint, request_id: RequestId | None = None
    ) -> Compiled:
        """``output`` compiled for the loaded model (cached); invalid_request if it cannot be."""
        loaded = self._loaded
        if loaded is None:
            raise NoModel("no model loaded", request_id=request_id)
        return loaded.grammars.compile(output, request_id)

    def decoder(self) -> TextDecoder:
        loaded = self._loaded
        if loaded is None:
            raise NoModel("no model loaded")
        return TextDecoder(
            loaded.model,
            loaded.tokenizer,
            caches=self._caches,
            capacity=self._max_concurrency,
            prefill_step_size=self._prefill_step_size,
            prefill_batch_size=self._prefill_batch_size,
            max_kv_size=loaded.max_kv_size,
            kv=loaded.kv,
            draft=loaded.draft,
        )

    def tokenize(self, request: Tokenize) -> tuple[int, ...]:
        tokenizer = self._require(request).tokenizer
        return tuple(tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens))

    def detokenize(self, request: Detokenize) -> str:
        loaded = self._require(request)
        check_token_ids(request, loaded.facts.vocab_size)
        return str(loaded.tokenizer.decode(list(request.tokens)))

    def inspect(self, request: Inspect) -> AttentionFacts:
        # here, not at the top: tempfile and shutil are not needed before the first hello
        from bridge.engines.text.inspect_attention import (
            InspectError,
            capture_attention,
            requested_directory,
            wire_error,
        )

        loaded = self._require(request)
        # One forward pass over the whole prompt: held to a generation's prompt
        # limits, before any file or directory is made.
        limits = ContextLimits(
            context_len=loaded.facts.context_len, max_prompt_tokens=self._max_prompt_tokens
        )
        one = Sampling(max_tokens=1)
        tokens = limits.encode(
            partial(encode_prompt, loaded.tokenizer),
            request.prompt,
            field="prompt",
            sampling=one,
            request_id=request.id,
        )
        limits.check(len(tokens), field="prompt", sampling=one, request_id=request.id)
        try:
            capture = capture_attention(
                loaded.model,
                tokens,
                architecture=loaded.facts.model_type,
                directory=requested_directory(request.dir),
            )
        except InspectError as exc:
            raise wire_error(exc, request.id) from None
        return capture.facts()

    def close(self) -> None:
        self._caches.clear()
        self._loaded = None
        clear_streams()

    # -- any thread ---------------------------------------------------------------------

    def facts(self) -> ModelFacts | None:
        loaded = self._loaded
        return loaded.facts if loaded else None

    def memory(self) -> MemoryStats:
        return memory_stats(prompt_cache=self._caches.stats)

    # -- helpers ------------------------------------------------------------------------

    def _require(self, request: GenerationRequest | Tokenize | Detokenize | Inspect) -> _Loaded:
        if self._loaded is None:
            require_mlx(request.id)  # without MLX no load can succeed: say so, not no_model
            raise NoModel("no model loaded; send load first", request_id=request.id)
        return self._loaded

    def _available_memory(self) -> int:
        freed = self._loaded.weights_bytes if self._loaded else 0
        return available_memory(self._memory_budget, freed=freed)

    def _chat_tokens(
        self,
        tokenizer: TokenizerWrapper,
        request: Chat,
        tools: tuple[Mapping[str, JsonValue], ...] | None,
        limits: ContextLimits,
        sampling: Sampling,
    ) -> list[int]:
        messages = [_template_message(m, i, request) for i, m in enumerate(request.messages)]
        kwargs: dict[str, Any] = dict(request.chat_template_kwargs or {})
        if tools:
            kwargs["tools"] = [dict(t) for t in tools]
        if tokenizer.has_chat_template:
            if limits.worth_prechecking(chat_chars(request)):
                # refuse a chat far over the limit before tokenizing it whole
                try:
                    text = tokenizer.apply_chat_template(
                        messages, add_generation_prompt=True, tokenize=False, **kwargs
                    )
                except Exception:  # the tokenizing call below reports it
                    text = None
                if isinstance(text, str):
                    limits.precheck(
                        partial(tokenizer.encode, add_special_tokens=False),
                        text,
                        field="messages",
                        sampling=sampling,
                        request_id=request.id,
                    )
            try:
                return list(
                    tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
                )
            except Exception as exc:
                raise InvalidRequest(
                    f"messages: the chat template failed: {exc}", request_id=request.id
                ) from None
        log.warning("model has no chat template; joining messages as 'role: content' lines")
        text = "".join(f"{m['role']}: {m['content'] or ''}\n" for m in messages) + "assistant: "
        return limits.encode(
            tokenizer.encode, text, field="messages", sampling=sampling, request_id=request.id
        )


def _share(footprint: Footprint, parts: int) -> Footprint:
    """What one of ``parts`` processes holding a split model takes."""
    if parts <= 1:
        return footprint
    return Footprint(
        weights=-(-footprint.weights // parts),
        kv_cache=-(-footprint.kv_cache // parts),
        kv_tokens=footprint.kv_tokens,
    )


def _specials(tokenizer: TokenizerWrapper) -> frozenset[str]:
    """The tokenizer's added tokens (special tokens among them), by text."""
    backend = getattr(tokenizer, "_tokenizer", tokenizer)
    added = getattr(backend, "get_added_vocab", None)
    return frozenset(added()) if callable(added) else frozenset()


def _template_message(message: ChatMessage, index: int, request: Chat) -> dict[str, Any]:
    if message.images:
        raise VisionNotSupported(
            f"messages[{index}].content: this model has no vision support; "
            "image parts need a vision model",
            request_id=request.id,
        )
    content = message.content
    if isinstance(content, tuple):
        content = "".join(p.text for p in content if isinstance(p, TextPart))
    return {"role": message.role, "content": content, **template_fields(message)}
