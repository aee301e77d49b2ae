"""How rollout groups travel from the actors to the trainer.

The interface is three methods so that the in-process queue used now can be swapped for a Ray queue
or a socket when actors and trainer live in different processes.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from parityrl.core.rollout import Group


class RolloutStream(Protocol):
    async def put(self, group: Group) -> None: ...

    async def get(self, num_groups: int) -> list[Group]: ...

    def peek(self) -> list[Group]:
        """The groups waiting, oldest first, without taking them (for the parity probe)."""
        ...


class InProcessStream:
    """An asyncio queue of groups, for actors and trainer sharing one event loop."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Group] = asyncio.Queue()
        self._waiting: list[Group] = []  # mirror of the queue's content, for peek()

    async def put(self, group: Group) -> None:
        self._waiting.append(group)
        await self._queue.put(group)

    async def get(self, num_groups: int) -> list[Group]:
        groups = [await self._queue.get() for _ in range(num_groups)]
        taken = {id(g) for g in groups}
        self._waiting = [g for g in self._waiting if id(g) not in taken]
        return groups

    def peek(self) -> list[Group]:
        return list(self._waiting)
