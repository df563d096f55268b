"""One worker over several processes: a model sharded with ``mx.distributed``.

``mlx-bridge --ranks N`` is rank 0: it owns the protocol (stdin, stdout,
stderr), starts ranks 1..N-1 as its own children (:mod:`.ranks`) and tells
them, over each one's stdin, every engine call that touches the model
(:mod:`.control`): load, unload, and each decoder step with the sequences
admitted and removed since the last one. Every rank makes the same calls
in the same order on its part of the model (:mod:`.leader` on rank 0,
:mod:`.follower` on the others), so all of them run the same collectives
and sample the same tokens; only rank 0 writes replies.

A rank that dies takes the worker with it: rank 0 ends every request in
flight with ``rank_failed`` and exits; the other ranks exit when rank 0's
pipe closes. No rank outlives rank 0.
"""
