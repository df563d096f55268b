"""The mlx-lm text engine.

``engine`` loads text models and generates with mlx-lm; ``prompt_cache`` keeps
conversations' KV caches for reuse; ``inspect_attention`` captures attention
for the ``inspect`` command. MLX and mlx-lm are imported lazily.
"""
