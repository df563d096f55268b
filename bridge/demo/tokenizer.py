"""The demo fixtures' tokenizer: a byte-level BPE trained offline on standard-library sources.

:mod:`bridge.demo_model` and :mod:`bridge.demo.vlm` train one each, with their
own vocabulary size, special tokens and list of source modules. The training
text is this interpreter's standard library, so the same Python gives the
same tokenizer. ``quiet_token_ids`` picks the ids whose embedding rows a
builder shrinks, so that random weights stream plain ASCII text.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "CHATML_SPECIALS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "corpus",
    "quiet_token_ids",
    "token_id",
    "tokenizer_config",
    "train_tokenizer",
]

EOS_TOKEN: Final = "<|im_end|>"
PAD_TOKEN: Final = "<|endoftext|>"
CHATML_SPECIALS: Final = (PAD_TOKEN, "<|im_start|>", EOS_TOKEN)
"""The ChatML specials, in the order they get their ids (0, 1, 2)."""

CORPUS_CHARS_PER_FILE: Final = 16_000


def train_tokenizer(
    *, vocab_size: int, special_tokens: Sequence[str], corpus_modules: Sequence[str]
) -> Tokenizer:
    """A byte-level BPE with ``special_tokens`` first, trained on ``corpus(corpus_modules)``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(corpus_modules), trainer=trainer)
    return tokenizer


def corpus(modules: Sequence[str]) -> list[str]:
    """The first characters of each standard-library file; a name missing here is skipped."""
    stdlib = pathlib.Path(os.__file__).parent
    texts = []
    for name in modules:
        try:
            text = (stdlib / name).read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        texts.append(text[:CORPUS_CHARS_PER_FILE])
    return texts


def quiet_token_ids(tokenizer: Tokenizer, specials: Sequence[str]) -> list[int]:
    """Ids of the specials and of tokens that are not printable ASCII on their own.

    Greedy decoding then streams clean ASCII text: no EOS, no lone UTF-8 bytes.
    """
    quiet = []
    for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        printable = text.isascii() and all(c.isprintable() or c in "\t\n" for c in text)
        if not text or not printable or text in specials:
            quiet.append(token_id)
    return quiet


def token_id(tokenizer: Tokenizer, token: str) -> int:
    """``token``'s id; ``RuntimeError`` when the tokenizer lacks it."""
    found = tokenizer.token_to_id(token)
    if found is None:
        raise RuntimeError(f"tokenizer lacks {token!r}")
    return found


def tokenizer_config(*, chat_template: str, model_max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json``: a fast tokenizer with ChatML's EOS and padding, no BOS."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template,
    }
