"""The mlx-vlm vision engine (the ``vlm`` extra).

``engine`` loads vision models and generates with mlx-vlm; ``images`` reads and
checks a chat's image parts under the worker's image policy; ``options`` holds
the vision command-line flags and builds the routing engine around the text
engine. mlx-vlm and Pillow are imported lazily.
"""
