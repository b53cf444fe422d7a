"""Backends: polls this node's external backends (`--backend-url`) and publishes their state.

Glue only: every `POLL_S` each backend is asked `GET /health` and `GET /v1/models`
(each within `PROBE_TIMEOUT_S`); `meshllm.http.backends` decides what that means
(up or down, which models) and the result goes out on topic `backends`, which the
Router, the Gossiper and the Tunnel follow.
"""

from __future__ import annotations

import asyncio
import contextlib

from meshllm.http import backends as core
from meshllm.http.upstream import Pool, UpstreamError, UpstreamRefused, get_status
from meshllm.runtime import messages as m
from meshllm.runtime.actor import Actor


class Backends(Actor):
    name = "backends"

    async def on_start(self) -> None:
        urls = tuple(core.parse_backend_url(u) for u in self.config.options.backend_urls)
        self.set = core.BackendSet(urls, self.config.backend_models)
        self.published: m.BackendsState | None = None
        self.polling = asyncio.create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._poll(i, b) for i, b in enumerate(self.set.backends)))
            state = self.set.state()
            if state != self.published:
                self._log_changes(self.published, state)
                self.published = state
                await self.bus.publish("backends", state)
            await asyncio.sleep(core.POLL_S)

    async def _poll(self, index: int, backend: core.BackendUrl) -> None:
        health: int | None = None
        reason = ""
        refused = False
        try:
            health = await get_status(
                backend.host, backend.port, "/health", timeout=core.PROBE_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:  # UpstreamError is an OSError
            reason = f"/health: {exc or type(exc).__name__}"
            refused = isinstance(exc, UpstreamRefused)
        listed = None
        if health is not None:
            try:
                listed = await _model_ids(backend)
            except (OSError, TimeoutError, ValueError) as exc:
                reason = f"/v1/models: {exc or type(exc).__name__}"
        if health is not None and not reason and not core.probe_ok(health, listed):
            reason = f"/health answered {health}"
        self.set.observed(index, core.probe_ok(health, listed), listed, reason, refused)

    def _log_changes(self, old: m.BackendsState | None, new: m.BackendsState) -> None:
        before = {b.url: b for b in old.backends} if old else {}
        for b in new.backends:
            was = before.get(b.url)
            if was is not None and (was.up, was.models) == (b.up, b.models):
                continue
            if b.up and not b.models:
                self.log.warning(
                    "backend %s is up but lists no model the mesh can name (an id with '/' "
                    "cannot be announced): name its models with --model NAME",
                    b.url,
                )
            elif b.up:
                self.log.info(
                    "backend %s is up, serving %s", b.url, ", ".join(b.models) or "no model"
                )
            elif was is not None and was.up:
                self.log.warning("backend %s is down: %s", b.url, b.reason)
            else:
                self.log.info("backend %s is not answering yet: %s", b.url, b.reason)

    async def on_stop(self) -> None:
        self.polling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.polling


async def _model_ids(backend: core.BackendUrl) -> tuple[str, ...] | None:
    """The ids `GET /v1/models` lists (None: no model list came back)."""
    pool = Pool(backend.host, backend.port)
    try:
        async with asyncio.timeout(core.PROBE_TIMEOUT_S):
            resp = await pool.request("GET", "/v1/models")
            if resp.status != 200 or (resp.length or 0) > core.MODELS_BODY_BYTES:
                resp.release()
                return None
            body = b""
            async for piece in resp.iter_body():
                body += piece
                if len(body) > core.MODELS_BODY_BYTES:
                    raise UpstreamError("the model list is too large")
            return core.parse_model_ids(body)
    finally:
        pool.close()
