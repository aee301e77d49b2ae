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

    def drop(self) -> None:
        """A finished group that will never be put (dynamic sampling dropped it)."""
        ...

    async def get(self, num_groups: int) -> list[Group]: ...

    def peek(self) -> list[Group]:
        """The groups waiting, oldest first, without taking them (for the parity probe)."""
        ...


class InProcessStream:
    """Groups in arrival order, for actors and trainer sharing one event loop.

    `stop_waiting_after`: once this many groups were dropped since the last `get` returned, a
    `get` holding at least one group returns it without waiting for the rest (dynamic sampling
    at its cap, train_fewer); None: a `get` waits for all it asked for.
    """

    def __init__(self, stop_waiting_after: int | None = None) -> None:
        self._waiting: list[Group] = []
        self._arrived = asyncio.Event()  # a put or a drop since the getter last looked
        self.stop_waiting_after = stop_waiting_after
        self.dropped = 0  # since the last get returned

    async def put(self, group: Group) -> None:
        self._waiting.append(group)
        self._arrived.set()

    def drop(self) -> None:
        self.dropped += 1
        self._arrived.set()

    async def get(self, num_groups: int) -> list[Group]:
        cap = self.stop_waiting_after
        while len(self._waiting) < num_groups and not (
                self._waiting and cap is not None and self.dropped >= cap):
            self._arrived.clear()
            await self._arrived.wait()
        groups, self._waiting = self._waiting[:num_groups], self._waiting[num_groups:]
        self.dropped = 0
        return groups

    def peek(self) -> list[Group]:
        return list(self._waiting)
