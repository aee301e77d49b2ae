"""A vLLM general plugin (entry point `vllm.general_plugins`): vLLM loads it in each of its own
processes (engine core, workers) before they build their message queues.

It does nothing unless the engine was started with `engine.blocking_waits: true`
(PARITYRL_ENGINE_BLOCKING_WAITS=1 in the engine's environment). Then every reader of vLLM's
shared-memory message queues waits for the writer's notification instead of spinning: vLLM's
`SpinCondition` busy-loops on `sched_yield` for a second after each message, so on the CPU backend
the engine-core process holds a whole core while its worker computes (measured with py-spy: on-CPU
in 99 % of samples, 92 % of them in sched_yield). On a machine with two cores that core is the one
the trainer needs.
"""

from __future__ import annotations

import os

ENV = "PARITYRL_ENGINE_BLOCKING_WAITS"


def register() -> None:
    if os.environ.get(ENV) != "1":
        return
    from vllm.distributed.device_communicators import shm_broadcast

    condition = shm_broadcast.SpinCondition
    if getattr(condition, "parityrl_blocking", False):
        return  # vLLM may load plugins more than once in a process
    original = condition.__init__

    def blocking_init(self, is_reader, context, notify_address, busy_loop_s: float = 1):
        original(self, is_reader, context, notify_address, busy_loop_s=0.0)

    condition.__init__ = blocking_init
    condition.parityrl_blocking = True
