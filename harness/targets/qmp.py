"""Blocking access to QEMU's QMP socket with qemu.qmp, every call with a deadline.

`execute()` is a one-shot call (connect, run, disconnect). `QmpConnection` keeps one connection
and its own event loop for callers that issue many commands (EL2 snapshots).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient


async def _execute(socket: Path, command: str, arguments: dict[str, Any] | None, timeout: float) -> Any:
    client = QMPClient("pkvm-harness")
    await asyncio.wait_for(client.connect(str(socket)), timeout)
    try:
        return await asyncio.wait_for(client.execute(command, arguments), timeout)
    finally:
        await client.disconnect()


def execute(socket: Path, command: str, arguments: dict[str, Any] | None = None,
            timeout: float = 5.0) -> Any:
    """Run one QMP command and return its result; raises on error or after `timeout` seconds."""
    return asyncio.run(_execute(socket, command, arguments, timeout))


class QmpConnection:
    """One QMP connection, used synchronously. Close it (or use `with`)."""

    def __init__(self, socket: Path, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("pkvm-harness")
        try:
            self._run(self._client.connect(str(socket)))
        except BaseException:
            self._loop.close()
            raise

    def _run(self, coro) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, self.timeout))

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return self._run(self._client.execute(command, arguments))

    def close(self) -> None:
        if not self._loop.is_closed():
            try:
                self._run(self._client.disconnect())
            finally:
                self._loop.close()

    def __enter__(self) -> QmpConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
