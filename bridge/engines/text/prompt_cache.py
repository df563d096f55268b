"""KV caches of recent conversations, kept so that the next turn prefills only its new tokens.

``PromptCacheStore`` holds one entry per *slot*: the default slot (requests
without ``cache_key``, which is all the legacy dialect sends) and one per
``cache_key``. An entry is a model's prompt cache (mlx-lm's per-layer
``KVCache`` objects) together with the exact token sequence it holds: the
prompt plus every token the model was fed while answering.

A request **takes** its slot's entry out of the store (a move, not a copy:
the cache is extended in place while it runs), and **puts** it back when the
generation ends, however it ends. Reuse follows mlx-lm's server:

- match on tokens (re-tokenized history is often not the sequence the model
  generated, so text is not compared): ``common`` is the length of the
  common prefix of the entry's tokens and the new prompt;
- keep ``min(common, len(prompt) - 1)`` tokens, so that at least one prompt
  token is fed and yields the first logits; trim the rest of the cache with
  ``trim_prompt_cache``;
- a cache that cannot be trimmed (a rotating ``max_kv_size`` cache that has
  wrapped, or a recurrent layer's state) is reused only when nothing needs
  trimming, i.e. when the prompt extends the entry; otherwise the request
  runs cold. A cache is never reused in a state a cold run would not reach.

Entries are bounded by count and by bytes (``nbytes`` of the caches), with
least-recently-used eviction; an entry larger than the byte bound is not
kept. ``max_entries=0`` turns the cache off.

Why not mlx-lm's ``LRUPromptCache``: it deep-copies the cache on every hit
(twice the KV memory while a turn runs) and keeps every branch of a
conversation as its own entry, so its entry bound does not bound
conversations. The slot store keeps one cache per conversation and hands it
out by move. It uses mlx-lm's own cache operations for everything else.

Only the engine thread calls ``take``/``put``/``clear``; ``stats`` is an
immutable snapshot that any thread may read. mlx-lm is imported lazily.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from protocol.replies import PromptCacheStats

log = logging.getLogger("bridge.mlx_prompt_cache")

DEFAULT_MAX_ENTRIES = 8
DEFAULT_MAX_BYTES = 2 << 30

KVCache = list[Any]
"""One model's prompt cache: mlx-lm's list of per-layer cache objects."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Reuse:
    """What ``take`` found: ``cache`` holds exactly ``prompt[:cached]``
    (None and 0 on a miss), so the caller feeds ``prompt[cached:]``."""

    cache: KVCache | None
    cached: int


MISS = Reuse(cache=None, cached=0)


@dataclass(slots=True)
class _Entry:
    tokens: tuple[int, ...]
    cache: KVCache
    nbytes: int


class PromptCacheStore:
    def __init__(
        self, *, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("prompt cache bounds must be ≥ 0")
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str | None, _Entry] = OrderedDict()
        self._bytes = 0
        self.stats = self._snapshot()

    @property
    def enabled(self) -> bool:
        return self._max_entries > 0 and self._max_bytes > 0

    def take(self, key: str | None, prompt: Sequence[int]) -> Reuse:
        """Remove slot ``key``'s entry and return the part of it ``prompt`` can reuse."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return MISS
        self._bytes -= entry.nbytes
        self.stats = self._snapshot()
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
        from mlx_lm.utils import common_prefix_len

        keep = min(common_prefix_len(entry.tokens, prompt), len(prompt) - 1)
        if keep <= 0:
            return MISS
        excess = len(entry.tokens) - keep
        if excess > 0:
            if not can_trim_prompt_cache(entry.cache):
                log.debug("slot %r: cache cannot be trimmed by %d; running cold", key, excess)
                return MISS
            trim_prompt_cache(entry.cache, excess)
        return Reuse(cache=entry.cache, cached=keep)

    def put(self, key: str | None, tokens: Sequence[int], cache: KVCache) -> None:
        """Keep ``cache`` in slot ``key``. ``tokens`` is every token fed to it
        that the caller knows of, in order: the cache may hold fewer (a
        prefill cut short) or one more (the token mlx-lm computes ahead); the
        entry records exactly what it holds, or is dropped when that can't be
        made exact."""
        if not self.enabled:
            return
        held = _cached_length(cache)
        if held is None:
            return
        if held > len(tokens):
            from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

            if not can_trim_prompt_cache(cache):
                return
            trim_prompt_cache(cache, held - len(tokens))
            held = len(tokens)
        if held <= 0:
            return
        nbytes = sum(int(c.nbytes) for c in cache)
        if nbytes > self._max_bytes:
            log.debug("slot %r: %d bytes is over the prompt-cache bound; not kept", key, nbytes)
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._entries[key] = _Entry(tokens=tuple(tokens[:held]), cache=cache, nbytes=nbytes)
        self._bytes += nbytes
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
        self.stats = self._snapshot()

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
        self.stats = self._snapshot()

    def _snapshot(self) -> PromptCacheStats:
        return PromptCacheStats(
            entries=len(self._entries),
            bytes=self._bytes,
            max_entries=self._max_entries,
            max_bytes=self._max_bytes,
        )


def _cached_length(cache: KVCache) -> int | None:
    """Tokens the cache holds: the first layer that counts them (attention
    layers do; recurrent layers' states do not)."""
    for layer in cache:
        offset = getattr(layer, "offset", None)
        if isinstance(offset, int):
            return offset
    return None
