"""A conformance kit for mlx-bridge workers: ``python -m protocol.conformance -- WORKER COMMAND...``

It spawns the worker command once per group of cases, drives it through a
table of exchanges (:mod:`.cases`) and checks every line the worker writes
against the JSON Schema and the spec's rules (:mod:`.session`), then prints a
pass/fail table. ``python -m bridge`` and ``python -m mock_worker`` both pass
it; a host author can point it at any worker, or at a wrapper around one.

Modules, one job each::

    cli        the command line; exit status 0 (no failure), 1 (a failure), 2 (usage)
    runner     one worker per group, a deadline per case, respawn after a failure
    session    send, read, route by id; the rules every line must keep
    process    the child process, its three pipes on threads, a transcript
    checker    the JSON Schema (jsonschema, imported lazily) and the reply decoder
    matching   expected lines as patterns
    fixture    --model, or the tiny model built by `python -m bridge.demo_model`
    report     the table
    table      Case and Group
    cases/     the cases: startup, bad_input, generation, legacy (go-mlx), cancel

Like the rest of :mod:`protocol` it imports nothing else of the project; it
needs only the standard library, ``orjson`` and (for the schema checks)
``jsonschema``.
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
