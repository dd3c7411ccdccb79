"""A fault-injecting reverse proxy: a real HTTP server between a client and a real upstream.

It forwards every request to the upstream and, on a seeded random fraction of requests on the sampling
paths, injects one of the faults a real deployment shows:

  "503"     answer 503 without forwarding (an overloaded or restarting replica)
  "502"     forward, let the upstream do the work, then drop its answer and say 502 (a gateway losing a
            response: the request *was* served, so a naive client that had already counted it duplicates)
  "reset"   forward, then close the connection without any response (a crashing proxy / network cut)

`delay_s` adds latency to every sampling request; `frozen = True` makes every request hang (a wedged host
that accepts connections and never answers). `kill()` makes the endpoint die on demand: the listening socket closes (new connections are refused) and
requests in flight are cut. `revive()` listens again on the same port.

Use in-process (`FaultProxy(upstream).start()`, a background thread with its own event loop) or as a
process: `python tests/fault_proxy.py --upstream URL [--fail-rate 0.2] [--port 0]` (prints `PORT <n>`).
Binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
from collections import Counter

from aiohttp import ClientSession, ClientTimeout, web

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding",
               "proxy-authenticate", "proxy-authorization", "te", "trailers", "upgrade"}
FAULTS = ("503", "502", "reset")


class FaultProxy:
    def __init__(self, upstream: str, *, fail_rate: float = 0.0, faults: tuple[str, ...] = FAULTS, seed: int = 0,
                 paths: tuple[str, ...] = ("/v1/chat/completions", "/v1/exact"), port: int = 0,
                 delay_s: float = 0.0):
        self.upstream = upstream.rstrip("/")
        self.fail_rate = fail_rate
        self.faults = faults
        self.paths = paths
        self.rng = random.Random(seed)
        self.port = port
        self.delay_s = delay_s  # added latency per sampling request (a slow network / busy server)
        self.stats: Counter = Counter()
        self.timeline: list[tuple[str, float, float]] = []  # (path, start, end) of every forwarded request, monotonic
        self.reject_status: int | None = None  # answer every sampling request with this (e.g. 404), if set
        self.frozen = False  # hang every request (a wedged host: connections accepted, nothing answered)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------------------------ handler
    def _pick_fault(self, path: str) -> str | None:
        if path not in self.paths:
            return None
        with self._lock:
            if self.rng.random() < self.fail_rate:
                return self.rng.choice(self.faults)
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        path = request.rel_url.path
        if self.frozen:
            self.stats["frozen"] += 1
            await asyncio.Event().wait()
        if self.reject_status is not None and path in self.paths:
            self.stats["rejected"] += 1
            return web.json_response({"error": {"message": f"injected rejection {self.reject_status}",
                                                "type": "invalid_request_error"}}, status=self.reject_status)
        fault = self._pick_fault(path)
        if fault == "503":
            self.stats["fault_503"] += 1
            return web.json_response({"error": {"message": "injected fault: service unavailable"}}, status=503)
        body = await request.read()
        started = time.monotonic()
        if self.delay_s and path in self.paths:
            await asyncio.sleep(self.delay_s)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(request.method, self.upstream + str(request.rel_url), data=body,
                                         headers=headers) as up:
            payload = await up.read()
            status = up.status
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP_HEADERS}
        if fault == "502":
            self.stats["fault_502"] += 1
            return web.json_response({"error": {"message": "injected fault: upstream answer lost"}}, status=502)
        if fault == "reset":
            self.stats["fault_reset"] += 1
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("injected reset")
        self.stats["forwarded"] += 1
        self.timeline.append((path, started, time.monotonic()))
        return web.Response(body=payload, status=status, headers=out_headers)

    # ------------------------------------------------------------------------------------ lifecycle
    async def _start_site(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if not self.port:
            self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - the bound port

    async def _stop_site(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            # Cut in-flight connections first: a dying endpoint does not finish its answers.
            server = runner.server
            if server is not None:
                for proto in list(getattr(server, "_connections", ())):
                    transport = getattr(proto, "transport", None)
                    if transport is not None:
                        transport.abort()
            await runner.cleanup()

    def _call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> "FaultProxy":
        ready = threading.Event()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=main, name="fault-proxy", daemon=True)
        self._thread.start()
        ready.wait()

        async def boot() -> None:
            self._session = ClientSession(timeout=ClientTimeout(total=None))
            await self._start_site()

        self._call(boot())
        return self

    def kill(self) -> None:
        """The endpoint dies: no more listening, in-flight requests cut."""
        self._call(self._stop_site())

    def revive(self) -> None:
        self._call(self._start_site())

    def stop(self) -> None:
        if self._loop is None:
            return

        async def down() -> None:
            await self._stop_site()
            if self._session is not None:
                await self._session.close()

        self._call(down())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--fail-rate", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    proxy = FaultProxy(a.upstream, fail_rate=a.fail_rate, seed=a.seed, port=a.port).start()
    print(f"PORT {proxy.port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        proxy.stop()


if __name__ == "__main__":
    main()
