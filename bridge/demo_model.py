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

A build goes into a temporary sibling directory that is renamed into place, so
an interrupted or concurrent build never leaves a half-written model behind
(a killed build may leave a hidden ``.NAME.building-*`` sibling to delete).
``ensure`` builds only when the stamp is missing or stale. ``build`` refuses
to replace a directory that has no stamp.

Usage::

    python -m bridge.demo_model OUT_DIR [--seed N] [--template NAME] [--force]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pathlib
import shutil
import sys
import tempfile
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, cast

if TYPE_CHECKING:
    import mlx.core as mx
    from mlx.nn import Module
    from tokenizers import Tokenizer

__all__ = ["BUILDER_VERSION", "STAMP_NAME", "TEMPLATES", "build", "ensure", "main"]

BUILDER_VERSION: Final = 1
"""Bump whenever the output changes, so that ``ensure`` rebuilds old fixtures."""

STAMP_NAME: Final = ".mlx_bridge_fixture"

EOS_TOKEN: Final = "<|im_end|>"
PAD_TOKEN: Final = "<|endoftext|>"
SPECIAL_TOKENS: Final = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

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
_CORPUS_CHARS_PER_FILE: Final = 16_000

_EMBED_STD: Final = 1.0
_OUT_PROJ_GAIN: Final = 16.0
_FINAL_NORM_GAIN: Final = 3.0
_QUIET_ROW_SCALE: Final = 0.01

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
    if _is_current(target, seed, template):
        return target
    return _build(target, seed=seed, template=template, keep_current=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build (or reuse) the model and write its path to stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m bridge.demo_model",
        description="Build a tiny offline random-weight qwen3 model for mlx-lm.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (0)")
    parser.add_argument(
        "--template",
        choices=TEMPLATES,
        default=DEFAULT_TEMPLATE,
        help=f"chat template family ({DEFAULT_TEMPLATE}; the others render tool calls)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the stamp is current")
    args = parser.parse_args(argv)
    builder = build if args.force else ensure
    try:
        path = builder(args.out_dir, seed=args.seed, template=args.template)
    except FileExistsError as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    sys.stdout.write(f"{path}\n")
    return 0


def _stamp(seed: int, template: str) -> dict[str, int | str]:
    stamp: dict[str, int | str] = {"builder_version": BUILDER_VERSION, "seed": seed}
    if template != DEFAULT_TEMPLATE:
        stamp["template"] = template
    return stamp


def _is_current(target: pathlib.Path, seed: int, template: str) -> bool:
    try:
        stamp = json.loads((target / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(stamp == _stamp(seed, template))


def _build(target: pathlib.Path, *, seed: int, template: str, keep_current: bool) -> pathlib.Path:
    if template not in TEMPLATES:
        raise ValueError(f"template: must be one of {', '.join(TEMPLATES)}, got {template!r}")
    target = target.absolute()
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private
        _write_model(staging, seed, template)
        _install(staging, target, seed=seed, template=template, keep_current=keep_current)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _install(
    staging: pathlib.Path, target: pathlib.Path, *, seed: int, template: str, keep_current: bool
) -> None:
    """Rename ``staging`` to ``target``, moving an earlier fixture out of the way.

    ``target`` is never half-written: it is absent, the old fixture, or the new
    one. Another process may install its own build between our steps; then we
    retry, or with ``keep_current`` accept its result.
    """
    for _ in range(10):
        try:
            staging.rename(target)
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise
        if keep_current and _is_current(target, seed, template):
            return
        _check_replaceable(target)
        retired = target.with_name(f".{target.name}.retired-{uuid.uuid4().hex}")
        try:
            target.rename(retired)
        except FileNotFoundError:
            continue
        shutil.rmtree(retired, ignore_errors=True)
    raise RuntimeError(f"could not install the demo model at {target}")


def _check_replaceable(target: pathlib.Path) -> None:
    """Raise ``FileExistsError`` unless ``target`` is absent, empty or stamped."""
    if not target.exists() or (target / STAMP_NAME).is_file():
        return
    if target.is_dir() and not any(target.iterdir()):
        return
    raise FileExistsError(
        errno.EEXIST, "not a demo-model directory; refusing to replace", str(target)
    )


def _write_model(path: pathlib.Path, seed: int, template: str) -> None:
    import mlx.core as mx
    from mlx_lm.models import qwen3

    tokenizer = _train_tokenizer()
    markers = _TOOL_MARKERS[template]
    if markers:
        from tokenizers import AddedToken

        tokenizer.add_tokens(
            [AddedToken(t, special=special, normalized=False) for t, special in markers]
        )
    tokenizer_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    config = _model_config(
        vocab_size=-(-tokenizer_vocab // 64) * 64,
        eos_token_ids=[
            _token_id(tokenizer, EOS_TOKEN),
            _token_id(tokenizer, PAD_TOKEN),
        ],
    )

    # The CPU stream keeps the random draws identical on machines with a GPU.
    with mx.stream(mx.cpu):
        args = qwen3.ModelArgs.from_dict(config)
        model = qwen3.Model(args)
        shapes = {name: tuple(a.shape) for name, a in _parameters(model).items()}
        weights = _init_weights(
            shapes,
            seed=seed,
            quiet_rows=[
                *_quiet_token_ids(tokenizer, (*SPECIAL_TOKENS, *(t for t, _ in markers))),
                *range(tokenizer_vocab, config["vocab_size"]),
            ],
        )
        model.load_weights(list(weights.items()), strict=True)
        flat = _parameters(model)
        mx.eval(flat)
    mx.save_safetensors(str(path / "model.safetensors"), flat, metadata={"format": "mlx"})

    _write_json(path / "config.json", config)
    tokenizer.save(str(path / "tokenizer.json"))
    _write_json(path / "tokenizer_config.json", _tokenizer_config(template))
    _write_json(path / STAMP_NAME, _stamp(seed, template))


def _parameters(model: Module) -> dict[str, mx.array]:
    from mlx.utils import tree_flatten

    return dict(cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters())))


def _init_weights(
    shapes: dict[str, tuple[int, ...]], *, seed: int, quiet_rows: Sequence[int]
) -> dict[str, mx.array]:
    """Seeded weights, one PRNG key per parameter name (in sorted order)."""
    import mlx.core as mx

    names = sorted(shapes)
    keys = mx.random.split(mx.random.key(seed), len(names))
    weights: dict[str, mx.array] = {}
    for index, name in enumerate(names):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            gain = _FINAL_NORM_GAIN if name == "model.norm.weight" else 1.0
            weights[name] = mx.full(shape, gain, dtype=mx.float32)
            continue
        noise = mx.random.normal(shape, dtype=mx.float32, key=keys[index])
        if name == "model.embed_tokens.weight":
            row_scale = mx.ones((shape[0], 1), dtype=mx.float32)
            row_scale[mx.array(list(quiet_rows))] = _QUIET_ROW_SCALE
            weights[name] = noise * _EMBED_STD * row_scale
        else:
            gain = _OUT_PROJ_GAIN if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            weights[name] = noise * (gain / shape[-1] ** 0.5)
    return weights


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


def _tokenizer_config(template: str = DEFAULT_TEMPLATE) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": _CHAT_TEMPLATES[template],
    }


def _train_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def _corpus() -> list[str]:
    stdlib = pathlib.Path(os.__file__).parent
    texts = []
    for name in _CORPUS_MODULES:
        try:
            text = (stdlib / name).read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        texts.append(text[:_CORPUS_CHARS_PER_FILE])
    return texts


def _quiet_token_ids(tokenizer: Tokenizer, specials: Sequence[str] = SPECIAL_TOKENS) -> list[int]:
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


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise RuntimeError(f"tokenizer lacks {token!r}")
    return token_id


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
