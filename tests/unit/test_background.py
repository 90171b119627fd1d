"""The bulk threads (background.py): a cancelled caller never outlives the work it handed off."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from sshfiles.background import run_bulk


def test_a_cancelled_bulk_call_returns_only_after_the_work_has_ended() -> None:
    """The work uses the caller's file descriptors: the caller's cleanup (closing them) may run only
    once the thread is done with them, or the numbers could be reused by another session's open."""
    ended = threading.Event()

    def step() -> str:
        time.sleep(0.3)
        ended.set()
        return "done"

    async def main() -> None:
        task = asyncio.create_task(run_bulk(step))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()  # cancelled twice: still waits
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ended.is_set()

    asyncio.run(main())


def test_a_bulk_call_returns_the_result_and_raises_the_error() -> None:
    async def main() -> None:
        assert await run_bulk(divmod, 7, 2) == (3, 1)
        with pytest.raises(ZeroDivisionError):
            await run_bulk(divmod, 1, 0)

    asyncio.run(main())
