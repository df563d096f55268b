"""The mlx-bridge protocol with a scripted engine and injectable faults, no MLX.

``python -m mock_worker`` runs the real request loop (:func:`bridge.loop.server.serve`)
over :class:`~mock_worker.engine.ScriptedEngine`, which echoes the prompt's
words as tokens. Hosts test against it anywhere, quickly, and pick a fault
per test case with a flag or a request's ``mock`` object (see README.md).
"""
