"""Build a tiny, offline, random-weight model that real ``mlx_lm.load`` accepts.

The bridge's tests and the README demo need a model that loads through the same
code path as a real checkpoint, answers in milliseconds on a CPU, and needs no
network and no download. This module writes one:

- ``config.json`` and ``model.safetensors``: a real mlx-lm ``qwen3`` architecture
  (2 layers, hidden size 64, float32, tied embeddings, 0.2M parameters, 0.8 MB)
  with seeded random weights;
- ``tokenizer.json`` and ``tokenizer_config.json``: a 2048-token byte-level BPE
  trained on a fixed list of Python standard-library sources, with the ChatML
  specials ``<|endoftext|>``, ``<|im_start|>`` and ``<|im_end|>`` and a
  Qwen-like ChatML chat template;
- ``.mlx_bridge_fixture``: a stamp, written last, naming the builder version
  and seed.

Random weights give near-uniform logits, and greedy decoding over near-ties
flips on tiny floating-point differences. So the weights are shaped to make
greedy choices decisive: the embedding matrix has std 1 (tied, so it is also
the output head), the final norm multiplies the logits by 3, and the attention
and MLP output projections are scaled up so that the layers, not the input
token, pick the next token (otherwise the model repeats its input).

The embedding rows of the special tokens, of byte tokens that are not
printable ASCII on their own, and of any padding ids are shrunk 100-fold.
Greedy (and temperature 1) decoding then streams plain ASCII text and
practically never emits ``<|im_end|>``, so a test gets as many tokens as it
asks for. The top logit is about 70-100; to make EOS happen on purpose, use
``mlx_lm.sample_utils.make_logits_processors(logit_bias={eos_id: 1000.0})``.

The same seed gives byte-identical files on the same Python (the tokenizer's
training text is this interpreter's standard library). The build takes about
0.2 s once ``mlx_lm`` is imported (that import alone takes about 1.4 s);
``ensure`` on a current directory imports nothing heavy.

Variants for tool calling (``template="qwen_tools"`` or ``"pythonic"``, or
``--template``) write the same kind of model with a chat template that
renders ``tools``, assistant ``tool_calls`` and ``tool`` results the way
those families do, and add the family's tool-call marker tokens to the
tokenizer (so the model's vocabulary grows to 2112, with spare ids):

- ``qwen_tools``: Qwen 2.5's layout: tools as JSON lines in ``<tools>`` in the
  system turn, calls as ``<tool_call>\n{"name": …, "arguments": …}\n</tool_call>``,
  results as ``<tool_response>`` in a user turn; mlx-lm picks its
  ``json_tools`` parser for it;
- ``pythonic``: LFM2's layout: tools in ``<|tool_list_start|>[…]<|tool_list_end|>``,
  calls as ``<|tool_call_start|>[name(key=value, …)]<|tool_call_end|>``,
  results in a ``tool`` turn; mlx-lm picks its ``pythonic`` parser.

The marker tokens' embedding rows are shrunk like the specials', so random
output never contains them. The default template's files are unchanged.

A build goes into a temporary sibling directory that is renamed into place
(:mod:`bridge.demo.files`), so an interrupted or concurrent build never leaves
a half-written model behind (a killed build may leave a hidden
``.NAME.building-*`` sibling to delete).
``ensure`` builds only when the stamp is missing or stale. ``build`` refuses
to replace a directory that has no stamp.

Usage::

    python -m bridge.demo_model OUT_DIR [--seed N] [--template NAME] [--force]
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, Final

from bridge.demo import files as demo_files
from bridge.demo.files import STAMP_NAME
from bridge.demo.tokenizer import (
    CHATML_SPECIALS,
    EOS_TOKEN,
    PAD_TOKEN,
    quiet_token_ids,
    token_id,
    tokenizer_config,
    train_tokenizer,
)
from bridge.demo.weights import padded_vocab_size, write_weights

__all__ = ["BUILDER_VERSION", "STAMP_NAME", "TEMPLATES", "build", "ensure", "main"]

BUILDER_VERSION: Final = 1
"""Bump whenever the output changes, so that ``ensure`` rebuilds old fixtures."""

SPECIAL_TOKENS: Final = CHATML_SPECIALS

TOKENIZER_VOCAB_SIZE: Final = 2048
MAX_POSITIONS: Final = 4096

# Long-lived standard-library modules; a name missing on some Python is skipped.
_CORPUS_MODULES: Final = (
    "abc.py",
    "argparse.py",
    "base64.py",
    "bisect.py",
    "calendar.py",
    "colorsys.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "fnmatch.py",
    "fractions.py",
    "functools.py",
    "glob.py",
    "heapq.py",
    "hmac.py",
    "keyword.py",
    "linecache.py",
    "numbers.py",
    "operator.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "shlex.py",
    "string.py",
    "textwrap.py",
    "tokenize.py",
    "types.py",
    "warnings.py",
)

_CHAT_TEMPLATE: Final = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen 2.5's tool layout (trimmed of its default system prompt). mlx-lm infers
# its json_tools parser from "<tool_call>" and "tool_call.name".
_QWEN_TOOLS_TEMPLATE: Final = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and '
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}'
    '\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first)
      or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{\\"name\\": \\"' + tool_call.name + '\\", \\"arguments\\": ' }}
{{- tool_call.arguments | tojson }}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
{{- '<|im_start|>user' }}
{%- endif %}
{{- '\\n<tool_response>\\n' + (message.content or '') + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# LFM2's pythonic tool layout. mlx-lm infers its pythonic parser from
# "<|tool_list_start|>".
_PYTHONIC_TEMPLATE: Final = """\
{%- set ns = namespace(system='') %}
{%- if messages[0].role == 'system' %}
{%- set ns.system = messages[0].content %}
{%- set messages = messages[1:] %}
{%- endif %}
{%- if tools %}
{%- set ns.system = ns.system + ('\\n' if ns.system else '')
    + 'List of tools: <|tool_list_start|>[' %}
{%- for tool in tools %}
{%- set ns.system = ns.system + (tool | tojson) + ('' if loop.last else ', ') %}
{%- endfor %}
{%- set ns.system = ns.system + ']<|tool_list_end|>' %}
{%- endif %}
{%- if ns.system %}{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' }}{%- endif %}
{%- for message in messages %}
{{- '<|im_start|>' + message.role + '\\n' }}
{%- if message.role == 'assistant' and message.tool_calls %}
{{- '<|tool_call_start|>[' }}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- tool_call.name + '(' }}
{%- if tool_call.arguments is mapping %}
{%- for key, value in tool_call.arguments.items() %}
{{- key + '=' + (value | tojson) + ('' if loop.last else ', ') }}
{%- endfor %}
{%- endif %}
{{- ')' + ('' if loop.last else ', ') }}
{%- endfor %}
{{- ']<|tool_call_end|>' }}
{%- endif %}
{%- if message.role == 'tool' %}
{{- '<|tool_response_start|>' + (message.content or '') + '<|tool_response_end|>' }}
{%- else %}
{{- message.content or '' }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

DEFAULT_TEMPLATE: Final = "chatml"
_CHAT_TEMPLATES: Final = {
    DEFAULT_TEMPLATE: _CHAT_TEMPLATE,
    "qwen_tools": _QWEN_TOOLS_TEMPLATE,
    "pythonic": _PYTHONIC_TEMPLATE,
}
TEMPLATES: Final = tuple(_CHAT_TEMPLATES)
"""Chat-template families ``build`` writes: ``chatml`` (the default) and two with tools."""

# Tokens each family adds to the tokenizer: (content, special).
_TOOL_MARKERS: Final[dict[str, tuple[tuple[str, bool], ...]]] = {
    DEFAULT_TEMPLATE: (),
    "qwen_tools": (("<tool_call>", False), ("</tool_call>", False)),
    "pythonic": (
        ("<|tool_list_start|>", True),
        ("<|tool_list_end|>", True),
        ("<|tool_call_start|>", True),
        ("<|tool_call_end|>", True),
        ("<|tool_response_start|>", True),
        ("<|tool_response_end|>", True),
    ),
}


def build(
    out_dir: str | os.PathLike[str], *, seed: int = 0, template: str = DEFAULT_TEMPLATE
) -> pathlib.Path:
    """Build the model into ``out_dir``, replacing any earlier fixture there.

    Returns the directory's absolute path. Raises ``FileExistsError`` if
    ``out_dir`` is a non-empty directory (or a file) that this builder did not
    write, rather than deleting someone's data.
    """
    return _build(pathlib.Path(out_dir), seed=seed, template=template, keep_current=False)


def ensure(
    out_dir: str | os.PathLike[str], *, seed: int = 0, template: str = DEFAULT_TEMPLATE
) -> pathlib.Path:
    """Return ``out_dir``'s absolute path, building it first unless it is current.

    Current means its stamp names this ``BUILDER_VERSION``, ``seed`` and ``template``.
    """
    target = pathlib.Path(out_dir).absolute()
    if demo_files.is_current(target, _stamp(seed, template)):
        return target
    return _build(target, seed=seed, template=template, keep_current=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build (or reuse) the model and write its path to stdout."""

    def add_template(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--template",
            choices=TEMPLATES,
            default=DEFAULT_TEMPLATE,
            help=f"chat template family ({DEFAULT_TEMPLATE}; the others render tool calls)",
        )

    return demo_files.command_line(
        argv,
        prog="python -m bridge.demo_model",
        description="Build a tiny offline random-weight qwen3 model for mlx-lm.",
        build=build,
        ensure=ensure,
        add_options=add_template,
    )


def _stamp(seed: int, template: str) -> dict[str, int | str]:
    stamp: dict[str, int | str] = {"builder_version": BUILDER_VERSION, "seed": seed}
    if template != DEFAULT_TEMPLATE:
        stamp["template"] = template
    return stamp


def _build(target: pathlib.Path, *, seed: int, template: str, keep_current: bool) -> pathlib.Path:
    if template not in TEMPLATES:
        raise ValueError(f"template: must be one of {', '.join(TEMPLATES)}, got {template!r}")
    return demo_files.build(
        target,
        stamp=_stamp(seed, template),
        write=functools.partial(_write_model, seed=seed, template=template),
        keep_current=keep_current,
        what="demo model",
    )


def _write_model(path: pathlib.Path, *, seed: int, template: str) -> None:
    from mlx_lm.models import qwen3

    tokenizer = train_tokenizer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        corpus_modules=_CORPUS_MODULES,
    )
    markers = _TOOL_MARKERS[template]
    if markers:
        from tokenizers import AddedToken

        tokenizer.add_tokens(
            [AddedToken(t, special=special, normalized=False) for t, special in markers]
        )
    tokenizer_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    config = _model_config(
        vocab_size=padded_vocab_size(tokenizer_vocab),
        eos_token_ids=[
            token_id(tokenizer, EOS_TOKEN),
            token_id(tokenizer, PAD_TOKEN),
        ],
    )

    write_weights(
        path,
        lambda: qwen3.Model(qwen3.ModelArgs.from_dict(config)),
        seed=seed,
        quiet_rows=[
            *quiet_token_ids(tokenizer, (*SPECIAL_TOKENS, *(t for t, _ in markers))),
            *range(tokenizer_vocab, config["vocab_size"]),
        ],
    )
    demo_files.write_json(path / "config.json", config)
    tokenizer.save(str(path / "tokenizer.json"))
    demo_files.write_json(
        path / "tokenizer_config.json",
        tokenizer_config(chat_template=_CHAT_TEMPLATES[template], model_max_length=MAX_POSITIONS),
    )


def _model_config(*, vocab_size: int, eos_token_ids: list[int]) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": MAX_POSITIONS,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": eos_token_ids,
    }


if __name__ == "__main__":
    sys.exit(main())
