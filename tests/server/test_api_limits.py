"""The API's bound on work in progress (:data:`~iscsi_vmtarget.server.api.app.MAX_ACTIVE`
running, :data:`~iscsi_vmtarget.server.api.app.MAX_WAITING` queued): with the admin
layer held busy, a burst gets exactly that many requests in and the rest a 503 at
once, and they all complete once it frees up. In-process, over real TLS."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from iscsi_vmtarget.server.api import app as api_app
from iscsi_vmtarget.server.api.tokens import TokenStore


class BusyAdmin:
    """Stands in for AdminServer: every request waits until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.running = 0
        self.most = 0

    async def run(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        self.running += 1
        self.most = max(self.most, self.running)
        await self.release.wait()
        self.running -= 1
        return {"sessions": []}


def test_burst_is_bounded(tmp_path: Path) -> None:
    secret = TokenStore(str(tmp_path)).create("flood", "read")

    async def main() -> list[int]:
        admin = BusyAdmin()
        server = api_app.ApiServer(admin, str(tmp_path), "127.0.0.1", 0)  # type: ignore[arg-type]
        port = await server.start()
        context = ssl.create_default_context(cafile=server.cert)
        headers = {"Authorization": f"Bearer {secret}"}
        burst = api_app.MAX_ACTIVE + api_app.MAX_WAITING + 20
        try:
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=0)
            ) as client:

                async def one() -> int:
                    url = f"https://127.0.0.1:{port}/v1/sessions"
                    async with client.get(url, headers=headers) as response:
                        if response.status == 503:
                            assert "busy" in json.loads(await response.text())["error"]
                        return response.status

                tasks = [asyncio.create_task(one()) for _ in range(burst)]
                for _ in range(200):  # until every request got in or was refused
                    await asyncio.sleep(0.05)
                    if sum(t.done() for t in tasks) == 20:
                        break
                assert admin.most == api_app.MAX_ACTIVE
                admin.release.set()
                return list(await asyncio.gather(*tasks))
        finally:
            await server.stop()

    codes = asyncio.run(main())
    assert codes.count(503) == 20
    assert codes.count(200) == api_app.MAX_ACTIVE + api_app.MAX_WAITING
