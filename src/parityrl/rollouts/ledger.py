"""Which training problems are done, so that each index is accounted for exactly once.

A problem index is *done* when its group was trained on, rejected (see actor.py), dropped as too
stale, or dropped for having no signal (dynamic sampling). In async mode groups finish out of
order, so the data position saved in a checkpoint is a watermark (every index below it is done)
plus the done indices above it; a resumed run starts at the watermark and skips those. Engine
restarts re-generate the same indices; they never take new ones. The per-step outcomes go to
problems.jsonl in the run directory.
"""

from __future__ import annotations

from parityrl.core.rollout import Group

OUTCOMES = ("trained", "rejected", "dropped", "no_signal")


class Ledger:
    def __init__(self, position: int = 0, done_above: list[int] | tuple[int, ...] = ()) -> None:
        self.position = position  # every index below this is done
        self.done_above = set(done_above)  # done indices at or above `position`
        self._next = position
        self._events: dict[str, list[int]] = {o: [] for o in OUTCOMES}

    def take(self) -> int:
        """The next index to start (indices done before a resume are skipped)."""
        while self._next in self.done_above or self._next < self.position:
            self._next += 1
        index = self._next
        self._next += 1
        return index

    @property
    def started(self) -> int:
        """One past the highest index started so far."""
        return self._next

    def mark(self, index: int, outcome: str) -> None:
        if index < self.position or index in self.done_above:
            raise RuntimeError(f"problem {index} is accounted for twice ({outcome})")
        self.done_above.add(index)
        while self.position in self.done_above:
            self.done_above.remove(self.position)
            self.position += 1
        self._events[outcome].append(index)

    def mark_group(self, group: Group, outcome: str) -> None:
        """The problem `group` was sampled from (its rollouts' `group_id`)."""
        self.mark(group[0].group_id, outcome)

    def flush(self) -> dict[str, list[int]]:
        """The outcomes since the last flush (for problems.jsonl)."""
        events, self._events = self._events, {o: [] for o in OUTCOMES}
        return events

    def state(self) -> dict:
        return {"position": self.position, "done_above": sorted(self.done_above)}
