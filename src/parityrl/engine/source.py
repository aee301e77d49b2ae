"""Where a run and the doctor get their engine: `start_engine(settings)`.

By default each caller starts a `RolloutEngine` of its own and closes it when done. Something that
keeps engines running between callers (the test suite's host of shared engines,
tests/engine_host.py) can stand in with `engines_from(source)`: a caller then gets a handle with the
engine's calls, whose `close()` hands the engine back instead of stopping it. Engine pools (several
engines, Ray) always start their own.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol

from parityrl.engine.engine import RolloutEngine
from parityrl.engine.settings import EngineSettings


class EngineSource(Protocol):
    async def start(self, settings: EngineSettings): ...


_source: EngineSource | None = None


async def start_engine(settings: EngineSettings):
    """A running engine with `settings`: a new one, or one from the installed source."""
    if _source is not None:
        return await _source.start(settings)
    return await RolloutEngine.start(settings)


@contextmanager
def engines_from(source: EngineSource) -> Iterator[None]:
    """Within the block, `start_engine` asks `source` (process-wide: the block is a session)."""
    global _source
    previous, _source = _source, source
    try:
        yield
    finally:
        _source = previous
