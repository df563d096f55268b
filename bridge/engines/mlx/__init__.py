"""MLX helpers shared by the text and vision engines.

``install`` checks that MLX and mlx-lm import (and says how to fix it when they
do not); ``memory`` reads and frees device memory; ``facts`` describes a loaded
model; ``sampling`` builds samplers, logits processors and logprobs. Each
imports MLX lazily, inside its functions.
"""
