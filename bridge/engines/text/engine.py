"""The real engine: mlx-lm models, run on the scheduler's one engine thread.

MLX, mlx-lm and psutil are imported lazily (``warm_up`` runs on the engine
thread right after start-up), so ``python -m bridge`` answers ``hello``
before MLX has finished importing.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from bridge.engines.context_limits import DEFAULT_MAX_PROMPT_TOKENS, ContextLimits, chat_chars
from bridge.engines.detokenizer import for_tokenizer
from bridge.engines.engine_protocol import Prepared, ShouldAbort, Step
from bridge.engines.mlx.facts import model_facts
from bridge.engines.mlx.install import mlx_problem, require_mlx
from bridge.engines.mlx.memory import available_memory, clear_streams, free_cache, memory_stats
from bridge.engines.mlx.sampling import check_token_ids, fit_vocab, make_sampling, step_logprobs
from bridge.engines.prompt_tokens import encode_prompt
from bridge.engines.text.prompt_cache import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    PromptCacheStore,
)
from bridge.engines.tool_calls import ToolCallFormat, parse_answer, template_tool_calls
from bridge.loop.generation import Outcome
from bridge.model_dir.files import ModelFiles, check_fits, open_model
from bridge.model_dir.remote_code import CodeGuard, remote_code_allowed
from protocol.errors import InvalidRequest, LoadFailed, NoModel, VisionNotSupported
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
    Sampling,
    TextPart,
    Tokenize,
)

if TYPE_CHECKING:
    import mlx.nn as nn
    from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger("bridge.engine")

# Prompt tokens per prefill chunk. Cancel is checked between chunks, so this
# bounds how long a cancel waits during prefill.
DEFAULT_PREFILL_STEP = 256


class _Aborted(Exception):
    """Raised from mlx-lm's prompt-progress callback to stop a prefill."""


@dataclass(slots=True)
class _Usage:
    """Filled in by ``generate``; read by ``outcome`` afterwards (same thread)."""

    cached_tokens: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class MlxPrepared(Prepared):
    """A prepared request plus its prompt-cache slot and tool-call parsing."""

    cache_key: str | None = None
    tool_format: ToolCallFormat | None = None
    tools: tuple[Mapping[str, JsonValue], ...] | None = None
    usage: _Usage = field(default_factory=_Usage)

    def outcome(self, answer: str) -> Outcome:
        cached = self.usage.cached_tokens
        if self.tool_format is None:
            return Outcome(cached_tokens=cached)
        parsed = parse_answer(answer, self.tool_format, self.tools)
        if parsed is None:
            return Outcome(cached_tokens=cached)
        return Outcome(cached_tokens=cached, tool_calls=parsed.tool_calls, content=parsed.content)


@dataclass(slots=True)
class _Loaded:
    model: nn.Module
    tokenizer: TokenizerWrapper
    facts: ModelFacts
    weights_bytes: int
    max_kv_size: int | None


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
    ) -> None:
        self._prefill_step_size = prefill_step_size
        self._trust_remote_code = trust_remote_code  # --trust-remote-code
        self._max_prompt_tokens = max_prompt_tokens
        self._memory_budget = memory_budget
        self._loaded: _Loaded | None = None
        self._caches = PromptCacheStore(
            max_entries=prompt_cache_entries, max_bytes=prompt_cache_bytes
        )

    # -- engine thread ---------------------------------------------------------------

    def warm_up(self) -> None:
        mlx_problem()  # imports MLX and mlx-lm, or logs one line saying what to install

    def load(self, request: Load) -> ModelFacts:
        require_mlx(request.id)
        remote_code_allowed(request, worker_allows=self._trust_remote_code)  # before any read
        return self.load_checked(request, open_model(request.path, request.adapter_path))

    def load_checked(self, request: Load, files: ModelFiles) -> ModelFacts:
        trust = remote_code_allowed(request, worker_allows=self._trust_remote_code)
        directory, needed = files.directory, files.weights_bytes
        adapter = str(files.adapter) if files.adapter is not None else None
        check_fits(
            files.footprint(request.context_len), self._available_memory(), force=request.force
        )
        self.unload()

        import mlx_lm

        try:
            with CodeGuard(directory, allowed=trust, request_id=request.id):
                model, tokenizer, config = mlx_lm.load(
                    str(directory),
                    adapter_path=adapter,
                    tokenizer_config={"trust_remote_code": trust},
                    return_config=True,
                    trust_remote_code=trust,
                )
        except LoadFailed:
            raise
        except Exception as exc:
            raise LoadFailed(f"{request.path}: {type(exc).__name__}: {exc}") from None
        facts = model_facts(model, config, path=str(directory), context_len=request.context_len)
        self._loaded = _Loaded(model, tokenizer, facts, needed, request.context_len)
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
                tokens = self._chat_tokens(tokenizer, request, limits, sampling)
                tools = request.tools or None
                if tools:
                    tool_format = ToolCallFormat.of(tokenizer)
                    if tool_format is None:
                        log.warning(
                            "tools given, but mlx-lm knows no tool-call format for this model; "
                            "the answer is returned as text"
                        )
        if not tokens:
            raise InvalidRequest("prompt: encodes to zero tokens", request_id=request.id)
        sampling = limits.check(
            len(tokens), field=field_name, sampling=sampling, request_id=request.id
        )
        return MlxPrepared(
            tokens=tuple(tokens),
            sampling=sampling,
            cache_key=request.cache_key,
            tool_format=tool_format,
            tools=tools,
        )

    def generate(
        self, prepared: Prepared, should_abort: ShouldAbort
    ) -> Generator[Step, None, None]:
        loaded = self._loaded
        if loaded is None:
            raise NoModel("no model loaded")
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.models.cache import make_prompt_cache

        s = prepared.sampling
        sampler, processors = make_sampling(s)

        def progress(done: int, total: int) -> None:
            if should_abort():
                raise _Aborted

        prompt = prepared.tokens
        key = prepared.cache_key if isinstance(prepared, MlxPrepared) else None
        reuse = self._caches.take(key, prompt)
        cache = reuse.cache
        if cache is None:
            cache = make_prompt_cache(loaded.model, max_kv_size=loaded.max_kv_size)
        if isinstance(prepared, MlxPrepared):
            prepared.usage.cached_tokens = reuse.cached
        if reuse.cached and s.repetition_penalty:
            # The penalty looks back over prompt tokens too: give it the cached ones.
            start = max(0, reuse.cached - s.repetition_context_size)
            history = mx.array(prompt[start : reuse.cached])
            processors = [_with_history(p, history) for p in processors]

        tokenizer = loaded.tokenizer
        eos = tokenizer.eos_token_ids
        # mlx-lm's own text (r.text) is not used: its BPE detokenizer drops
        # the first token's space, and the stream must join up to detokenize
        text = for_tokenizer(tokenizer)
        fed = list(prompt)  # every token the cache may hold, in order
        keep = False  # whether the cache is in a known state when this ends
        responses = stream_generate(
            loaded.model,
            tokenizer,
            mx.array(prompt[reuse.cached :]),
            max_tokens=s.max_tokens,
            sampler=sampler,
            logits_processors=processors or None,
            prompt_cache=cache,
            prompt_progress_callback=progress,
            prefill_step_size=self._prefill_step_size,
        )
        try:
            for r in responses:
                token = r.token
                fed.append(token)
                is_eos = r.finish_reason == "stop" and token in eos
                piece = "" if is_eos else text.add(token)
                if r.finish_reason is not None:
                    piece += text.finish()
                logprob, top = step_logprobs(r.logprobs, token, s.logprobs, tokenizer)
                yield Step(
                    text=piece,
                    token_id=token,
                    is_eos=is_eos,
                    finish_reason=r.finish_reason,
                    logprob=logprob,
                    top_logprobs=top,
                    prompt_tps=r.prompt_tps,
                    generation_tps=r.generation_tps,
                    peak_memory_bytes=int(r.peak_memory * 1e9),
                )
            keep = True
        except _Aborted:
            keep = True
            return
        except GeneratorExit:  # the consumer stopped reading: cancel, stop string, length
            keep = True
            raise
        finally:
            responses.close()
            if keep:
                self._keep_cache(key, fed, cache)

    def _keep_cache(self, key: str | None, fed: list[int], cache: list[Any]) -> None:
        try:
            self._caches.put(key, fed, cache)
        except Exception:  # losing a warm cache must not fail the request
            log.exception("prompt cache: could not keep slot %r", key)

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
        limits: ContextLimits,
        sampling: Sampling,
    ) -> list[int]:
        messages = [_template_message(m, i, request) for i, m in enumerate(request.messages)]
        kwargs: dict[str, Any] = dict(request.chat_template_kwargs or {})
        if request.tools:
            kwargs["tools"] = [dict(t) for t in request.tools]
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
    out: dict[str, Any] = {"role": message.role, "content": content}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls is not None:
        out["tool_calls"] = template_tool_calls(message.tool_calls)
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _with_history(processor: Any, history: Any) -> Any:
    """``processor`` seeing ``history`` (cached prompt tokens) before the tokens
    mlx-lm passes it, as it would have in a run without the prompt cache."""
    import mlx.core as mx

    def call(tokens: Any, logits: Any) -> Any:
        return processor(mx.concatenate([history, tokens]), logits)

    return call
