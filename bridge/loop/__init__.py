"""The request loop: read request lines, answer them, stream tokens.

``server`` starts the worker (stdin reader, signal handling, the first
``hello``); ``router`` decodes each line and answers what needs no model;
``scheduler`` runs the model commands one at a time on the engine thread;
``jobs``, ``generation`` and ``stops`` turn an engine's steps into token lines
and one terminal reply; ``stdio`` and ``signals`` own the process's pipes and
signals. It knows engines only through :mod:`bridge.engines.engine_protocol`,
never MLX or a model directory, so ``mock_worker`` runs it over a scripted
engine.
"""
