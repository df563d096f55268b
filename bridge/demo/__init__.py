"""Builders of the tiny offline fixture models used by tests, examples and docs.

``model`` writes a random-weight mlx-lm ``qwen3`` (run as ``python -m
bridge.demo_model DIR``), ``vlm`` a random-weight mlx-vlm vision model;
``tokenizer`` trains their byte-level BPE, ``weights`` shapes and writes their
weights, and ``files`` builds into a temporary sibling and renames it into
place. MLX is imported lazily, only when a model is built.
"""
