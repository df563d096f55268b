"""The vision engine: mlx-vlm models, run on the scheduler's one engine thread.

It satisfies :class:`bridge.engines.engine_protocol.Engine` like the mlx-lm engine does, and
streams with the same :class:`~bridge.engines.engine_protocol.Step` semantics, so that
``bridge.loop.generation`` (stop strings, cancel, timings, ``done``) is shared:

- ``prepare`` decodes the request's images (:mod:`bridge.engines.vision.images`), renders the
  messages with mlx-vlm's ``apply_chat_template`` (given the image count) and
  runs mlx-vlm's ``prepare_inputs``: the prompt's token ids (each image
  expanded to its image tokens, which count as prompt tokens) plus the pixel
  tensors, kept in a :class:`VisionPrepared`.
- ``generate`` (the decoder's solo lane, :mod:`bridge.engines.vision.batch`)
  takes the request's prompt-cache slot and returns how many tokens it held
  and a generator of steps; it drives mlx-vlm's ``generate_step`` itself, the way mlx-lm's
  ``stream_generate`` drives its own: exactly ``max_tokens`` steps for
  ``length``, and an EOS step (``is_eos``) for ``stop``. mlx-vlm's
  ``stream_generate`` is not used because it offers no hook during prefill
  (it passes its own ``prompt_cache_checkpoint``) and it repeats the last token
  on a ``length`` finish. The prefill hook is ``generate_step``'s
  ``prompt_cache_checkpoint``: asked for at every ``--prefill-step-size``
  tokens, it raises when the request was cancelled. Decode cancel is checked
  per token by the caller. Models that mlx-vlm never prefills in chunks
  (a few encoder-decoder families) can be cancelled only after prefill.

mlx, mlx-vlm and Pillow are imported lazily, on the engine thread.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Generator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.engines.context_limits import DEFAULT_MAX_PROMPT_TOKENS, ContextLimits
from bridge.engines.detokenizer import for_tokenizer
from bridge.engines.engine_protocol import (
    DEFAULT_MAX_CONCURRENCY,
    KvShape,
    LoadStep,
    Prepared,
    ReportLoad,
    ShouldAbort,
    Step,
    no_report,
)
from bridge.engines.mlx.facts import model_facts
from bridge.engines.mlx.memory import (
    available_memory,
    clear_streams,
    free_cache,
    kv_budget,
    memory_stats,
)
from bridge.engines.mlx.sampling import (
    check_token_ids,
    fit_vocab,
    make_sequence_sampling,
    step_logprobs,
)
from bridge.engines.prompt_tokens import encode_prompt
from bridge.engines.text.engine import DEFAULT_PREFILL_BATCH, DEFAULT_PREFILL_STEP, KV_SHARE
from bridge.engines.text.prompt_cache import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    MISS,
    PromptCacheStore,
    Reuse,
)
from bridge.engines.tool_calls import (
    answer_parser,
    offered_tools,
    template_fields,
    tool_format_for,
)
from bridge.engines.vision.batch import VisionDecoder
from bridge.engines.vision.images import ImagePolicy, image_parts, load_images
from bridge.model_dir.config import kv_cache_bytes
from bridge.model_dir.files import ModelFiles, check_fits, open_model
from bridge.model_dir.remote_code import CodeGuard, remote_code_allowed
from protocol.errors import BadImage, InvalidRequest, LoadFailed, NoModel
from protocol.fields import JsonValue
from protocol.replies import AttentionFacts, MemoryStats, ModelFacts, VisionDetails
from protocol.requests import (
    Chat,
    ChatMessage,
    Detokenize,
    Generate,
    GenerationRequest,
    ImagePart,
    Inspect,
    Load,
    Sampling,
    TextPart,
    Tokenize,
)

if TYPE_CHECKING:
    import mlx.nn as nn

# Model families whose prompt caches are reused: mlx-vlm's qwen2-vl family
# places tokens with mRoPE, whose positions for the fed suffix are computed
# from the whole prompt (``_prompt_positions``); other families' position
# state is not handled yet, and they run every prompt cold.
CACHEABLE = frozenset({"qwen2_vl", "qwen2_5_vl"})

log = logging.getLogger("bridge.vlm_engine")

INSTALL_HINT = "pip install 'mlx-bridge[vlm]'"

# Roles whose messages may carry images, as in OpenAI's API. (mlx-vlm drops
# image markers from system and assistant turns, which would misalign the
# images with the prompt.)
IMAGE_ROLES = ("user",)


class _Aborted(Exception):
    """Raised from the prefill checkpoint hook to stop a cancelled prefill."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VisionPrepared(Prepared):
    """Prompt tokens plus what mlx-vlm's model needs for the images."""

    pixel_values: Any = None
    mask: Any = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # the images' content, for the prompt cache (their placeholder tokens are
    # the same for any image), and where their tokens end in the prompt
    image_key: str = ""
    images_end: int = 0


@dataclass(slots=True)
class _Loaded:
    model: nn.Module
    processor: Any
    facts: ModelFacts
    weights_bytes: int
    max_kv_size: int | None
    directory: Path
    trust_remote_code: bool
    # mlx-lm's view of the tokenizer, for its tool-call format
    # (bridge.engines.tool_calls): read on the first chat with tools
    tool_tokenizer: Any = None
    tool_tokenizer_read: bool = False
    kv: KvShape = field(default_factory=KvShape)  # for the scheduler's memory admission

    def tools_tokenizer(self) -> Any:
        if not self.tool_tokenizer_read:
            self.tool_tokenizer_read = True
            self.tool_tokenizer = _tool_tokenizer(self.directory, trust=self.trust_remote_code)
        return self.tool_tokenizer


def require_mlx_vlm(path: str) -> None:
    """Raise ``load_failed`` with an install hint when mlx-vlm is missing."""
    try:
        import mlx_vlm  # noqa: F401
    except ImportError as exc:
        raise LoadFailed(
            f"{path}: this is a vision model, and vision models need mlx-vlm, which is not "
            f"installed ({exc}); install the extra: {INSTALL_HINT}"
        ) from None


class MlxVlmEngine:
    def __init__(
        self,
        *,
        prefill_step_size: int = DEFAULT_PREFILL_STEP,
        memory_budget: int | None = None,
        images: ImagePolicy | None = None,
        trust_remote_code: bool = False,
        max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
        prompt_cache_entries: int = DEFAULT_MAX_ENTRIES,
        prompt_cache_bytes: int = DEFAULT_MAX_BYTES,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        """``max_concurrency``: sequences decoded at once (bridge.engines.vision.batch)."""
        self._max_concurrency = max_concurrency
        self._caches = PromptCacheStore(
            max_entries=prompt_cache_entries, max_bytes=prompt_cache_bytes
        )
        self._prefill_step_size = prefill_step_size
        self._trust_remote_code = trust_remote_code  # --trust-remote-code
        self._max_prompt_tokens = max_prompt_tokens
        self._memory_budget = memory_budget
        self._images = images or ImagePolicy()
        self._loaded: _Loaded | None = None

    # -- engine thread ---------------------------------------------------------------

    def warm_up(self) -> None:
        import mlx.core  # noqa: F401

    def load(self, request: Load, report: ReportLoad | None = None) -> ModelFacts:
        remote_code_allowed(request, worker_allows=self._trust_remote_code)  # before any read
        files = open_model(request.path, request.adapter_path)
        return self.load_checked(request, files, report)

    def load_checked(
        self, request: Load, files: ModelFiles, report: ReportLoad | None = None
    ) -> ModelFacts:
        """Loads in one call to mlx-vlm: ``report`` hears ``checking``, the
        weights' bytes at 0 and when read, and ``ready``."""
        say = report or no_report
        trust = remote_code_allowed(request, worker_allows=self._trust_remote_code)
        directory, needed = files.directory, files.weights_bytes
        adapter = str(files.adapter) if files.adapter is not None else None
        check_fits(
            files.footprint(request.context_len), self._available_memory(), force=request.force
        )
        require_mlx_vlm(request.path)
        say(LoadStep(step="checking"))
        self.unload()
        say(LoadStep(step="weights", done=0, total=needed, unit="bytes"))

        import mlx_vlm
        from mlx_vlm.utils import load_config

        try:
            # mlx-vlm hands its keyword arguments to the processor's loading, whose
            # default is to trust: pass False explicitly, and guard what ignores it.
            with CodeGuard(directory, allowed=trust, request_id=request.id):
                model, processor = mlx_vlm.load(
                    str(directory), adapter_path=adapter, trust_remote_code=trust
                )
            config = load_config(directory)
        except LoadFailed:
            raise
        except Exception as exc:
            raise LoadFailed(f"{request.path}: {type(exc).__name__}: {exc}") from None
        facts = replace(
            model_facts(model, config, path=str(directory), context_len=request.context_len),
            vision=True,
            vision_details=self._vision_details(model, processor),
        )
        kv = KvShape(
            bytes_per_token=kv_cache_bytes(files.config, files.weights, 1),
            budget=kv_budget(self._memory_budget, weights=needed, share=KV_SHARE),
        )
        self._loaded = _Loaded(
            model, processor, facts, needed, request.context_len, directory, trust, kv=kv
        )
        say(LoadStep(step="weights", done=needed, total=needed, unit="bytes"))
        say(LoadStep(step="ready"))
        log.info(
            "loaded vision model %s (%s, %d layers)", directory, facts.model_type, facts.layers
        )
        return facts

    def unload(self) -> bool:
        self._forget_caches()
        if self._loaded is None:
            return False
        self._loaded = None
        free_cache()
        return True

    def prepare(self, request: GenerationRequest) -> Prepared:
        loaded = self._require(request)
        if request.constraint is not None:
            raise InvalidRequest(
                f"{request.constraint.field.split('.')[0]}: a vision model cannot constrain "
                "its output yet; send it without response_format or grammar",
                request_id=request.id,
            )
        limits = ContextLimits(
            context_len=loaded.facts.context_len, max_prompt_tokens=self._max_prompt_tokens
        )
        sampling = fit_vocab(request, loaded.facts.vocab_size)
        match request:
            case Generate():
                tokens = limits.encode(
                    partial(encode_prompt, _tokenizer(loaded.processor)),
                    request.prompt,
                    field="prompt",
                    sampling=sampling,
                    request_id=request.id,
                )
                if not tokens:
                    raise InvalidRequest("prompt: encodes to zero tokens", request_id=request.id)
                sampling = limits.check(
                    len(tokens), field="prompt", sampling=sampling, request_id=request.id
                )
                return Prepared(
                    tokens=tuple(tokens), sampling=sampling, cache_key=request.cache_key
                )
            case Chat():
                return self._prepare_chat(loaded, request, limits, sampling)

    def decoder(self) -> VisionDecoder:
        """Vision sequences decoded together (:mod:`bridge.engines.vision.batch`)."""
        loaded = self._loaded
        if loaded is None:
            raise NoModel("no model loaded")
        return VisionDecoder(
            self.generate,
            model=loaded.model,
            processor=loaded.processor,
            tokenizer=_tokenizer(loaded.processor),
            embed=partial(_row_kwargs, loaded.model),
            capacity=self._max_concurrency,
            prefill_step_size=self._prefill_step_size,
            prefill_batch_size=DEFAULT_PREFILL_BATCH,
            kv=loaded.kv,
            wired=partial(_wired_limit, loaded.model),
        )

    def generate(
        self, prepared: Prepared, should_abort: ShouldAbort
    ) -> tuple[int, Generator[Step, None, None]]:
        """How many prompt tokens the prompt cache held, and the steps.

        A cache is reused only for the model families whose position state is
        known (:data:`CACHEABLE`), only under a slot that names the images'
        content, and only when it holds every image token (an image cannot be
        fed in part)."""
        loaded = self._loaded
        if loaded is None:
            raise NoModel("no model loaded")
        key = self._slot(loaded, prepared)
        reuse = MISS
        if key is not None:
            reuse = self._caches.take(key, prepared.tokens)
            end = prepared.images_end if isinstance(prepared, VisionPrepared) else 0
            if reuse.cached and reuse.cached < end:
                reuse = MISS
        steps = self._steps(loaded, prepared, should_abort, key, reuse)
        return reuse.cached, steps

    def _steps(
        self,
        loaded: _Loaded,
        prepared: Prepared,
        should_abort: ShouldAbort,
        key: str | None,
        reuse: Reuse,
    ) -> Generator[Step, None, None]:
        import mlx.core as mx
        from mlx_vlm.generate import generate_step
        from mlx_vlm.models import cache

        s = prepared.sampling
        sampling = make_sequence_sampling(s)
        sampler, processors = sampling.sampler, sampling.processors
        pixel_values, mask, extra = _images_of(prepared)
        cached = reuse.cached
        feed = list(prepared.tokens[cached:])
        if cached:  # the images are in the cache already: feed the text after them
            pixel_values, mask = None, None
            extra = _prompt_positions(loaded.model, prepared.tokens, extra)
        n_prompt = len(feed)
        step_size = self._prefill_step_size

        def checkpoint(done: int, _cache: object) -> None:
            if should_abort():
                raise _Aborted

        model = loaded.model
        processor = loaded.processor
        tokenizer = _tokenizer(processor)
        stopping = tokenizer.stopping_criteria
        text = for_tokenizer(tokenizer)  # the stream joins up to detokenize
        kv = reuse.cache
        if kv is None:
            kv = cache.make_prompt_cache(model.language_model, max_kv_size=loaded.max_kv_size)
        answer: list[int] = []
        steps = generate_step(
            mx.array([feed]),
            model,
            pixel_values,
            mask,
            max_tokens=s.max_tokens,
            sampler=sampler,
            logits_processors=processors or None,
            prompt_cache=kv,
            prefill_step_size=step_size,
            prompt_cache_checkpoint=checkpoint,
            prompt_cache_checkpoint_lengths=list(range(step_size, n_prompt, step_size)),
            **extra,
        )
        try:
            for n, (token, logprobs) in enumerate(steps):
                token = int(token)
                answer.append(token)
                eos = bool(stopping(token))
                last = eos or n + 1 == s.max_tokens
                piece = "" if eos else text.add(token)
                if last:
                    piece += text.finish()
                logprob, top = step_logprobs(logprobs, token, s.logprobs, tokenizer)
                yield Step(
                    text=piece,
                    token_id=token,
                    is_eos=eos,
                    finish_reason=("stop" if eos else "length") if last else None,
                    logprob=logprob,
                    top_logprobs=top,
                )
                if last:
                    break
        except _Aborted:
            return
        finally:
            steps.close()
            if key is not None:
                self._keep(key, [*prepared.tokens, *answer], kv)
            mx.clear_cache()

    def tokenize(self, request: Tokenize) -> tuple[int, ...]:
        tokenizer = _tokenizer(self._require(request).processor)
        return tuple(tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens))

    def detokenize(self, request: Detokenize) -> str:
        loaded = self._require(request)
        check_token_ids(request, loaded.facts.vocab_size)
        return str(_tokenizer(loaded.processor).decode(list(request.tokens)))

    def inspect(self, request: Inspect) -> AttentionFacts:
        """Refused: mlx-vlm's language models take positions (mrope) and image
        features that a bare-token capture pass does not provide."""
        self._require(request)
        raise InvalidRequest(
            "cmd: inspect supports text models only; the loaded model is a vision model",
            request_id=request.id,
        )

    def close(self) -> None:
        self._forget_caches()
        self._loaded = None
        clear_streams()

    # -- any thread ---------------------------------------------------------------------

    def facts(self) -> ModelFacts | None:
        loaded = self._loaded
        return loaded.facts if loaded else None

    def memory(self) -> MemoryStats:
        return memory_stats(prompt_cache=self._caches.stats)

    # -- helpers ------------------------------------------------------------------------

    def _cacheable(self, loaded: _Loaded) -> bool:
        """Whether this model's prompt caches are kept and reused at all."""
        return self._caches.enabled and loaded.facts.model_type in CACHEABLE

    def _slot(self, loaded: _Loaded, prepared: Prepared) -> str | None:
        """The prompt-cache slot: the request's ``cache_key`` and its images'
        content; None when this model's caches are not reused."""
        if not self._cacheable(loaded):
            return None
        images = prepared.image_key if isinstance(prepared, VisionPrepared) else ""
        return f"{prepared.cache_key or ''}\0{images}"

    def _keep(self, key: str, tokens: list[int], kv: Any) -> None:
        try:
            self._caches.put(key, tokens, kv)
        except Exception:  # losing a warm cache must not fail the request
            log.exception("prompt cache: could not keep slot %r", key)

    def _forget_caches(self) -> None:
        self._caches.clear()

    def _require(self, request: GenerationRequest | Tokenize | Detokenize | Inspect) -> _Loaded:
        if self._loaded is None:
            raise NoModel("no model loaded; send load first", request_id=request.id)
        return self._loaded

    def _available_memory(self) -> int:
        freed = self._loaded.weights_bytes if self._loaded else 0
        return available_memory(self._memory_budget, freed=freed)

    def _vision_details(self, model: Any, processor: Any) -> VisionDetails:
        config = model.config
        vision = getattr(config, "vision_config", None)

        def pick(source: Any, *names: str) -> Any:
            for name in names:
                value = getattr(source, name, None)
                if value is not None:
                    return value
            return None

        token_id = pick(config, "image_token_id", "image_token_index")
        token = pick(processor, "image_token")
        return VisionDetails(
            image_processor=type(getattr(processor, "image_processor", None)).__name__,
            image_token=token if isinstance(token, str) else None,
            image_token_id=int(token_id) if isinstance(token_id, int) else None,
            vision_model_type=str(pick(vision, "model_type") or "unknown"),
            vision_layers=_count(pick(vision, "depth", "num_hidden_layers", "num_layers")),
            vision_hidden_size=_count(pick(vision, "embed_dim", "hidden_size", "width")),
            patch_size=_int_or_none(pick(vision, "patch_size", "spatial_patch_size")),
            max_images=self._images.max_images,
            max_image_bytes=self._images.max_bytes,
            remote_images=self._images.allow_remote,
        )

    def _prepare_chat(
        self, loaded: _Loaded, request: Chat, limits: ContextLimits, sampling: Sampling
    ) -> Prepared:
        from mlx_vlm.prompt_utils import apply_chat_template
        from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

        located = list(image_parts(request.messages))
        for item in located:
            role = request.messages[item.message].role
            if role not in IMAGE_ROLES:
                raise InvalidRequest(
                    f"{item.field}: images are accepted in user messages only, "
                    f"not in a {role!r} message",
                    request_id=request.id,
                )
        if request.tool_choice in ("required", "function"):  # before any image is read
            raise InvalidRequest(
                "tool_choice: a vision model cannot constrain its output yet; send "
                "'auto' or 'none'",
                request_id=request.id,
            )
        images = load_images(located, self._images, request_id=request.id)
        messages = [_template_message(m) for m in request.messages]
        kwargs: dict[str, Any] = dict(request.chat_template_kwargs or {})
        tools = offered_tools(request)
        if tools:
            kwargs["tools"] = [dict(t) for t in tools]
        config = loaded.model.config
        processor = loaded.processor
        try:
            prompt = apply_chat_template(
                processor, config, messages, num_images=len(images), **kwargs
            )
        except Exception as exc:
            raise InvalidRequest(
                f"messages: the chat template failed: {exc}", request_id=request.id
            ) from None
        if isinstance(prompt, str) and limits.worth_prechecking(len(prompt)):
            # the text without the image tokens: a lower bound, counted cheaply
            limits.precheck(
                partial(_tokenizer(processor).encode, add_special_tokens=False),
                prompt,
                field="messages",
                sampling=sampling,
                request_id=request.id,
            )
        try:
            inputs = prepare_inputs(
                processor,
                images=images or None,
                prompts=prompt,
                image_token_index=getattr(config, "image_token_index", None),
                add_special_tokens=should_add_special_tokens(config.model_type, processor),
            )
        except Exception as exc:
            if images:
                raise BadImage(
                    f"messages: the model's image processor refused the images: {exc}",
                    request_id=request.id,
                ) from None
            raise InvalidRequest(f"messages: {exc}", request_id=request.id) from None
        input_ids = inputs.get("input_ids")
        tokens: list[int] = input_ids.flatten().tolist() if input_ids is not None else []
        if not tokens:
            raise InvalidRequest("messages: encode to zero tokens", request_id=request.id)
        sampling = limits.check(
            len(tokens), field="messages", sampling=sampling, request_id=request.id
        )
        extra = {
            k: v
            for k, v in inputs.items()
            if k not in ("input_ids", "pixel_values", "attention_mask")
        }
        image_id = getattr(config, "image_token_id", None) or getattr(
            config, "image_token_index", None
        )
        ends = [i + 1 for i, t in enumerate(tokens) if t == image_id] if images else []
        return VisionPrepared(
            tokens=tuple(tokens),
            sampling=sampling,
            cache_key=request.cache_key,
            image_key=_image_digest(images) if self._cacheable(loaded) else "",
            images_end=ends[-1] if ends else 0,
            answer_parser=answer_parser(
                tool_format_for(loaded.tools_tokenizer(), tools) if tools else None, tools
            ),
            pixel_values=inputs.get("pixel_values") if images else None,
            mask=inputs.get("attention_mask"),
            extra=extra,
        )


def _prompt_positions(
    model: Any, tokens: Sequence[int], extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The whole prompt's mRoPE positions and deltas, for a run that feeds only
    the part after a cached prefix: mlx-vlm takes them from the caller before
    what it would derive from the suffix alone (which would restart at 0)."""
    import mlx.core as mx

    lm = model.language_model
    positions, deltas = lm.get_rope_index(
        mx.array([list(tokens)]), extra.get("image_grid_thw"), extra.get("video_grid_thw"), None
    )
    return {"position_ids": positions, "rope_deltas": deltas}


def _image_digest(images: Sequence[Any]) -> str:
    """The images' content (mode, size, pixels), in order, as one digest."""
    if not images:
        return ""
    h = hashlib.sha256()
    for image in images:
        h.update(f"{image.mode}:{image.size}:".encode())
        h.update(image.tobytes())
    return h.hexdigest()


def _tokenizer(processor: Any) -> Any:
    return processor.tokenizer if hasattr(processor, "tokenizer") else processor


def _count(value: Any) -> int:
    """A figure from the model's config for ``info``: the integer, or 0 for
    anything else (a config is untrusted; a reply must always encode)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    return 0


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, list | tuple) and value and isinstance(value[0], int):
        return int(value[0])
    return None


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as mlx-vlm's ``apply_chat_template`` reads it: content parts
    become ``{"type":"text"}`` and ``{"type":"image"}`` in their order."""
    content: str | list[dict[str, JsonValue]] | None
    if isinstance(message.content, tuple):
        content = []
        for part in message.content:
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                content.append({"type": "image"})
        if not any(p["type"] == "image" for p in content):
            content = "".join(str(p["text"]) for p in content)
    else:
        content = message.content
    return {"role": message.role, "content": content or "", **template_fields(message)}


def _tool_tokenizer(directory: Any, *, trust: bool) -> Any:
    """mlx-lm's tokenizer wrapper for the model directory: it picks the
    tool-call format (markers and parser) from the tokenizer's config and
    chat template, as for a text model. None if mlx-lm cannot read it."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    try:
        return load_tokenizer(directory, {"trust_remote_code": trust})
    except Exception as exc:  # tools then come back as text, as for a model without a format
        log.warning("no tool-call format for this vision model: %s: %s", type(exc).__name__, exc)
        return None


def _images_of(prepared: Prepared) -> tuple[Any, Any, dict[str, Any]]:
    """The pixel tensors, their mask and the model's other image arguments
    (none for a text-only request)."""
    if isinstance(prepared, VisionPrepared):
        return prepared.pixel_values, prepared.mask, dict(prepared.extra)
    return None, None, {}


def _row_kwargs(model: nn.Module, prepared: Prepared) -> dict[str, Any] | None:
    """``prepared``'s row for mlx-vlm's batch: the prompt's input embeddings
    (the vision tower run over its images) and its position state, as
    mlx-vlm's own ``batch_generate`` builds them; None if the model cannot."""
    import mlx.core as mx

    pixel_values, mask, extra = _images_of(prepared)
    embed = getattr(model, "get_input_embeddings", None)
    if embed is None or not hasattr(model, "language_model"):
        return None
    try:
        found = embed(mx.array([list(prepared.tokens)]), pixel_values, mask=mask, **extra)
        fields = found.to_dict() if hasattr(found, "to_dict") else {"inputs_embeds": found}
    except Exception:  # a family mlx-vlm's batch does not serve: the solo lane does
        log.exception("vision batch: no input embeddings; the request runs alone")
        return None
    if fields.get("inputs_embeds") is None:
        return None
    return {**extra, **{k: v for k, v in fields.items() if v is not None}}


def _wired_limit(model: nn.Module) -> AbstractContextManager[None]:
    """mlx-vlm's wired-memory limit for ``model`` (Metal only), as a context manager."""
    from mlx_vlm.generate.common import generation_stream, wired_limit

    limit: AbstractContextManager[None] = wired_limit(model, [generation_stream])
    return limit
