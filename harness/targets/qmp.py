"""Blocking calls to QEMU's QMP socket, each with a deadline (qemu.qmp's legacy connect has none)."""

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
