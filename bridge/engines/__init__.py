"""The engines: what runs a model behind the request loop.

``engine_protocol`` is the interface the loop calls (the only module here the
loop imports); ``routing`` picks the text or vision engine by the model
directory. The modules at this level hold what every engine shares and that
needs no MLX (context limits, tool calls, incremental detokenizing, prompt
encoding); :mod:`bridge.engines.mlx` holds the MLX helpers they share, and
:mod:`bridge.engines.text` and :mod:`bridge.engines.vision` the mlx-lm and
mlx-vlm engines. MLX, mlx-lm and mlx-vlm are imported lazily, inside
functions, never when a module here is imported.
"""
