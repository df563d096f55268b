"""Reading a model directory, which the worker does not trust.

``untrusted`` opens, bounds and parses files from it; ``safetensors_header``
reads weight headers without loading weights; ``config`` checks
``config.json`` and derives the figures the load gate needs; ``files`` finds
and confines the directory and checks that the model fits in memory;
``kind`` tells text from vision models; ``remote_code`` guards what Python
code from the directory may run. Nothing here imports MLX.
"""
