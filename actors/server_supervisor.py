"""ServerSupervisor: keeps the wanted llama-server running and says how it is doing.

A reconcile loop (circus's shape): compare the wanted server with the running
one, start or stop until they match, restart a dead server with backoff, and
publish `LocalServerState` on topic `local` at every change.

llama-server's port is picked here, never read from its output (which prints
model metadata, so a model could name any port): the supervisor takes a free
port on 127.0.0.1, passes it with `--port`, and calls the server ready only
when that port answers /health with 200 and the listening socket is the
child's own (another local user could take the port first and answer).

In a split group (meshllm.placement.split) the wanted part decides what
runs: a host runs llama-server with `--rpc`, through one loopback port per
worker that the Tunnel carries to that worker; a worker runs llama.cpp's RPC
server on 127.0.0.1 only (checked from /proc: it has no authentication) with
its tensor cache in the node's home; a standby runs nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import threading
import time
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any

import msgspec

from meshllm.http.upstream import get_status
from meshllm.runtime import messages as m
from meshllm.runtime.actor import Actor
from meshllm.runtime.backoff import Backoff
from meshllm.runtime.bus import AskTimeout
from meshllm.runtime.config import ModelSpec
from meshllm.runtime.procutil import (
    die_with_parent,
    free_port,
    listening_addresses,
    listens_on_loopback,
    redact,
    stop_process,
)
from meshllm.runtime.rpc import LOOPBACK, rpc_server_command, split_args

BIND_FAILED = re.compile(
    rb"couldn't bind HTTP server socket, hostname: 127\.0\.0\.1, port: (\d+)\s*$"
)
"""llama-server's own message (server-http.cpp) when the port it was given is taken."""
BIND_TRIES = 3
ERRORISH = re.compile(rb"error|failed|cannot|unable|invalid|not found|abort", re.IGNORECASE)
HEALTH_POLL_S = 0.05
RPC_START_S = 30.0
"""How long an RPC server may take to listen."""
SAME_BUILD = (
    "a split's host and workers must run llama.cpp from the same build "
    "(meshllm's setup builds llama-server and ggml-rpc-server together)"
)
OUTPUT_LINE_BYTES = 64 * 1024
SWITCH_DRAIN_S = 60.0
"""How long a server told to make way for another model may take to end its requests."""
DRAIN_POLL_S = 0.1
"""How often a pausing node asks the Proxy and the Tunnel what is still in flight."""
DOWNLOAD_TRIES = 3
"""Downloads of one wanted model that fail for a reason that may pass (the server down,
the connection dropping after the downloader's own retries) before the model is failed for
good; a permanent failure (HTTP 4xx, wrong size or digest, disk full) fails it at once."""


class DownloadCancelled(Exception):
    """The wanted model changed (or the node stops) while its file was downloading."""


def bind_failed(lines: Iterable[bytes], port: int) -> bool:
    """Whether llama-server's output says it could not bind `port` (whole lines only)."""
    return any(
        (match := BIND_FAILED.search(line)) is not None and int(match.group(1)) == port
        for line in lines
    )


def failure_reason(
    lines: collections.deque[bytes], returncode: int | None, program: str = "llama-server"
) -> str:
    """The most telling line of a server's output for why it stopped."""
    for line in reversed(lines):
        if ERRORISH.search(line):
            reason = line.decode(errors="replace").strip()
            if re.search(r"\brpc\b|version", reason, re.IGNORECASE):
                reason += f" ({SAME_BUILD})"
            return reason
    tail = lines[-1].decode(errors="replace").strip() if lines else "no output"
    return f"{program} exited with code {returncode}: {tail}"


def threads_arg(llama_args: Iterable[str]) -> int | None:
    """The `--threads`/`-t` given to llama-server, which a worker's RPC server uses too."""
    args = list(llama_args)
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in ("--threads", "-t"):
            value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            return int(value) if value.isdigit() and int(value) > 0 else None
    return None


class ServerSupervisor(Actor):
    name = "server_supervisor"
    subscriptions = {"elector": ["wanted"]}

    async def on_start(self) -> None:
        self.want: m.ServeModel = m.ServeModel()
        """What the Elector last asked for; a new object at every change."""
        self.proc: asyncio.subprocess.Process | None = None
        self.policy = Backoff(base_s=0.2, max_s=15.0, window_s=60.0)
        self.download_policy = Backoff(base_s=2.0, max_s=60.0)
        self.gave_up: ModelSpec | None = None
        self.fetched: dict[str, str] = {}
        self.digests: dict[str, tuple[int, str]] = {}
        """Model name -> (size, sha256) of what this node downloaded."""
        """Targets downloaded and checked by this actor: a restart does not check them again."""
        """The wanted model whose download failed for good (until another is wanted)."""
        self.output: collections.deque[bytes] = collections.deque(maxlen=60)
        self.state = m.LocalServerState()
        self.wake = asyncio.Event()
        self.download_cancel = threading.Event()
        self.logs = Path(self.config.home) / "logs"
        self.log_path = self.logs / "llama-server.log"
        """Where llama-server's output goes (a worker's RPC server: `rpc-server.log`)."""
        self.paused = False
        """`meshllm ctl pause`: announced, so no router sends requests here."""
        self.halted = False
        """Paused and drained: the wanted server is not run until `ctl resume`."""
        self.drain_task: asyncio.Task[None] | None = None
        self.switch_task: asyncio.Task[None] | None = None
        """Ending the requests of a server told to make way for another model."""
        self.extras: dict[str, asyncio.Task[None]] = {}
        """`--models-dir`: model name -> the task that keeps its own llama-server running."""
        self.extra_states: dict[str, m.ExtraServer] = {}
        self.wanted_extras: tuple[ModelSpec, ...] = ()
        self.loop_task = asyncio.create_task(self._reconcile_forever())
        await self._set(m.LocalServerState())

    async def on_topic(self, topic: str, msg: m.Message) -> None:
        if isinstance(msg, m.ServeModel) and (msg.spec, msg.split) != (
            self.want.spec,
            self.want.split,
        ):
            self.log.info(
                "told to serve %s (%s)", msg.spec.name if msg.spec else "nothing", msg.reason
            )
            self.want = msg
            self.download_cancel.set()
            self.policy.reset()
            self.download_policy.reset()
            if self.proc is not None and self.state.state == "ready" and self.state.model:
                if self.switch_task is None or self.switch_task.done():
                    self.switch_task = asyncio.create_task(self._drain_then_stop(self.proc))
            elif self.proc is not None:
                await stop_process(self.proc)
            self.wake.set()
        if isinstance(msg, m.ServeModel):
            # After the old main server stopped: a switch frees its memory first.
            self.wanted_extras = msg.extras
            await self._run_extras(() if self.halted else msg.extras)

    async def on_ask(self, msg: m.Message) -> m.Message:
        if isinstance(msg, m.PauseServing):
            return await self._pause(msg) if msg.paused else await self._resume(msg.reason)
        return await super().on_ask(msg)

    async def _pause(self, msg: m.PauseServing) -> m.Message:
        """Stop being a target now; stop the server once its requests ended (or at the
        drain deadline). Announced at once: every Router drops this node, every Elector
        counts it out (its model goes to other nodes by the usual rules)."""
        if self.paused:
            return m.CtlDone("already paused")
        self.paused = True
        self.log.info("pausing (%s): finishing the requests in flight", msg.reason or "asked to")
        await self._set(self.state)
        self.drain_task = asyncio.create_task(self._drain_then_halt(msg.drain_s))
        model = self.state.model
        if not model:
            return m.CtlDone("paused (this node served nothing)")
        return m.CtlDone(
            f"pausing: {model} takes no new requests; llama-server stops once the requests "
            f"in flight ended (at most {msg.drain_s:g}s)"
        )

    async def _resume(self, reason: str) -> m.Message:
        if not self.paused:
            return m.CtlDone("not paused")
        self.log.info("resuming (%s)", reason or "asked to")
        if self.drain_task is not None:
            self.drain_task.cancel()
        if self.halted:
            # A new object: the reconcile loop starts the wanted server afresh.
            self.want = msgspec.structs.replace(self.want)
        self.paused = self.halted = False
        await self._run_extras(self.wanted_extras)
        self.policy.reset()
        self.wake.set()
        await self._set(self.state)
        return m.CtlDone("resumed: serving again")

    async def _in_flight(self, model: str) -> int | None:
        """Requests the local server of `model` still has (Proxy and Tunnel), or None
        when one of them did not answer or the Proxy still routes new ones here."""
        total = 0
        for actor in ("proxy", "tunnel"):
            try:
                reply = await self.bus.ask(actor, m.CountInFlight(model), timeout=2.0)
            except AskTimeout:
                return None
            if not isinstance(reply, m.InFlight) or reply.routed:
                return None
            total += reply.count
        return total

    async def _drain_then_stop(self, proc: asyncio.subprocess.Process) -> None:
        """Another model is wanted: this server is no target any more (announced
        `draining`), ends the requests it has (at most `SWITCH_DRAIN_S`), then stops; the
        reconcile loop, waiting on it, goes on to the wanted model."""
        model = self.state.model
        self.log.info(
            "%s takes no new requests; it stops once those in flight ended (at most %gs)",
            model,
            SWITCH_DRAIN_S,
        )
        await self._set(msgspec_replace(self.state, state="draining"))
        await self._wait_drained([model], SWITCH_DRAIN_S, model, proc)
        await stop_process(proc)

    async def _wait_drained(
        self,
        models: list[str],
        drain_s: float,
        who: str,
        proc: asyncio.subprocess.Process | None = None,
    ) -> None:
        """Wait until the local servers of `models` have no request in flight and no Proxy
        routes new ones there, at most `drain_s` (or until `proc` exited); say so when the
        time ran out."""
        deadline = time.monotonic() + drain_s
        left: int | None = 0
        while models and (proc is None or proc.returncode is None):
            if time.monotonic() >= deadline:
                self.log.warning(
                    "%s: %s requests still in flight after %gs; stopping anyway",
                    who,
                    "some" if left is None else left,
                    drain_s,
                )
                return
            counts = [await self._in_flight(model) for model in models]
            left = None if None in counts else sum(c or 0 for c in counts)
            if left == 0:
                return
            await asyncio.sleep(DRAIN_POLL_S)

    async def _drain_then_halt(self, drain_s: float) -> None:
        models = [self.state.model] if self.state.state == "ready" else []
        models += [x.model for x in self.state.ready_extras()]
        await self._wait_drained(models, drain_s, "paused")
        self.halted = True
        await self._run_extras(())
        self.want = msgspec.structs.replace(self.want)  # a new object: the loop moves on
        self.download_cancel.set()
        if self.proc is not None:
            await stop_process(self.proc)
        self.wake.set()
        self.log.info("paused: llama-server stopped")

    async def _set(self, state: m.LocalServerState) -> None:
        if state.paused != self.paused:
            state = msgspec_replace(state, paused=self.paused)
        extras = tuple(self.extra_states[name] for name in sorted(self.extra_states))
        if state.extras != extras:
            state = msgspec_replace(state, extras=extras)
        # Said once per change of the main server (not again for a pause or an extra's).
        same = msgspec_replace(state, paused=self.state.paused, extras=self.state.extras)
        said = same == self.state
        self.state = state
        if state.state in ("ready", "failed") and not said:
            self.log.info(
                "%s %s%s",
                state.model,
                state.state,
                f" on port {state.port}" if state.state == "ready" else f": {state.reason}",
            )
        await self.bus.publish("local", state)

    async def _reconcile_forever(self) -> None:
        try:
            await self._reconcile()
        except Exception:
            self.log.exception("supervision loop failed; restarting the actor")
            self.stopping.set()

    async def _reconcile(self) -> None:
        """Make the running server match the wanted one (circus's reconcile loop)."""
        while True:
            want = self.want
            spec, part = (None, None) if self.halted else (want.spec, want.split)
            self.wake.clear()
            if spec is None:
                if self.state != m.LocalServerState(paused=self.paused):
                    await self._set(m.LocalServerState())
                await self.wake.wait()
                continue
            if part is not None and part.part in ("standby", "nofit"):
                # Nothing runs here; the group may grow, so even a model that fits
                # nowhere now waits (its note says why), rather than failing.
                await self._set(
                    m.LocalServerState(spec.name, state="waiting", reason=part.note, split=part)
                )
                await self.wake.wait()
                continue
            if part is not None and part.part == "worker":
                path = ""
                await self._run_rpc_server_once(want)
            else:
                path = spec.path or self.fetched.get(spec.target) or await self._download(spec)
            for _ in range(BIND_TRIES if path else 0):
                if self.want is not want or not await self._run_server_once(want, path):
                    break  # a taken port (rare race) is retried at once on another one
            if self.want is not want:
                continue  # switched or dropped: start the new one without backoff
            if self.gave_up is spec:
                await self.wake.wait()  # failed for good: only a new wanted model moves on
                continue
            worker = part is not None and part.part == "worker"
            policy = self.policy if path or worker else self.download_policy
            delay = policy.failed(time.monotonic())
            self.log.warning("restarting %s in %.1fs", spec.name, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), delay)

    # -- `--models-dir`: more llama-servers, each for one model on disk, alone ---------

    async def _run_extras(self, wanted: tuple[ModelSpec, ...]) -> None:
        """Start a keeper for each wanted extra model, stop the others' (and wait)."""
        by_name = {spec.name: spec for spec in wanted if spec.path}
        gone = [name for name in self.extras if name not in by_name]
        stopping = [self.extras.pop(name) for name in gone]
        for task in stopping:
            task.cancel()
        await asyncio.gather(*stopping, return_exceptions=True)
        for name, spec in by_name.items():
            if name not in self.extras:
                self.extra_states[name] = m.ExtraServer(name)
                self.extras[name] = asyncio.create_task(self._keep_extra(spec))
        if gone:
            for name in gone:
                self.extra_states.pop(name, None)
            self.log.info("stopped the llama-servers of %s", ", ".join(gone))
            await self._set(self.state)

    async def _keep_extra(self, spec: ModelSpec) -> None:
        """Keep `spec`'s own llama-server running: restart it with backoff when it exits
        or cannot start, publishing each state (`LocalServerState.extras`)."""
        policy = Backoff(base_s=0.2, max_s=15.0, window_s=60.0)
        output: collections.deque[bytes] = collections.deque(maxlen=60)
        while True:
            state = m.ExtraServer(spec.name, "loading", restarts=policy.total)
            try:
                state, returncode = await self._run_extra_once(spec, state, output, policy)
                reason = failure_reason(output, returncode)
            except Exception as exc:  # the binary gone, no file descriptors, no log file
                reason = f"cannot start llama-server: {exc}"
            failed = msgspec.structs.replace(state, state="failed", port=0, reason=reason)
            await self._set_extra(failed)
            delay = policy.failed(time.monotonic())
            self.log.warning("%s failed (%s); restarting in %.1fs", spec.name, reason, delay)
            await asyncio.sleep(delay)

    async def _run_extra_once(
        self,
        spec: ModelSpec,
        state: m.ExtraServer,
        output: collections.deque[bytes],
        policy: Backoff,
    ) -> tuple[m.ExtraServer, int | None]:
        """One run of an extra llama-server, from start to exit (stopped on the way out,
        a cancel included): its last state and exit code."""
        port = free_port()
        cmd = self._server_command(spec.path, spec.name, port)
        self.log.info("starting %s", " ".join(redact(cmd)))
        output.clear()
        proc = await spawn(cmd)
        try:
            state = msgspec.structs.replace(state, port=port, pid=proc.pid)
            await self._set_extra(state)
            log_path = self.logs / f"llama-server-{spec.name}.log"
            reader = asyncio.create_task(read_output(proc, log_path, output))
            try:
                timeout = self.config.options.load_timeout_s
                if await await_health(proc, port, timeout, output):
                    self.log.info("%s ready on port %s", spec.name, port)
                    await self._set_extra(msgspec.structs.replace(state, state="ready"))
                    policy.reset()
                await proc.wait()
                await asyncio.wait_for(reader, 2)
            finally:
                reader.cancel()
        finally:
            await stop_process(proc)
        return state, proc.returncode

    async def _set_extra(self, state: m.ExtraServer) -> None:
        if state.model in self.extras:
            self.extra_states[state.model] = state
            await self._set(self.state)

    def _server_command(self, path: str, name: str, port: int, *rpc: str) -> list[str]:
        return [
            self.config.llama_server,
            "--model", path,
            "--alias", name,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--no-webui",
            *rpc,
            *self.config.options.llama_args,
        ]  # fmt: skip

    async def _download(self, spec: ModelSpec) -> str:
        """Fetch a model that is not on disk; '' (and state failed) when that fails.

        A failure that retrying cannot fix, or the `DOWNLOAD_TRIES`th of the others, sets
        `gave_up`: the model stays failed, with the reason, instead of being fetched again
        every few seconds (a 404, a wrong digest or a full disk would only repeat)."""
        from meshllm.models.download import DownloadError, download_file

        loop = asyncio.get_running_loop()
        base = m.LocalServerState(model=spec.name, path=spec.target, state="downloading")
        last = [0.0]
        self.download_cancel = cancel = threading.Event()

        def progress(done: int, total: int | None) -> None:
            if cancel.is_set():
                raise DownloadCancelled  # unwinds the download thread at its next chunk
            now = time.monotonic()
            if now - last[0] >= 0.5 or (total and done >= total):
                last[0] = now
                share = f"{100 * done // total}%" if total else f"{done} bytes"
                state = msgspec_replace(
                    base,
                    reason=f"downloading {share}",
                    downloaded=done,
                    download_total=total or 0,
                )
                asyncio.run_coroutine_threadsafe(self._set(state), loop)

        await self._set(base)
        self.log.info("downloading %s from %r", spec.name, spec.url[:200])
        try:
            done = await asyncio.to_thread(
                download_file,
                spec.url,
                Path(spec.target),
                expected_size=spec.size or None,
                sha256=spec.sha256 or None,
                progress=progress,
            )
        except DownloadCancelled:
            self.log.info("download of %s cancelled (the partial file is kept)", spec.name)
            return ""
        except (DownloadError, OSError) as exc:
            permanent = not isinstance(exc, DownloadError) or exc.permanent
            tries = len(self.download_policy.recent) + 1
            reason = str(exc)
            if permanent or tries >= DOWNLOAD_TRIES:
                self.gave_up = spec
                if not permanent:
                    reason += f" (gave up after {tries} tries)"
            self.log.warning("download of %s failed: %s", spec.name, reason)
            await self._set(msgspec_replace(base, state="failed", reason=reason))
            return ""
        self.download_policy.reset()
        self.fetched[spec.target] = str(done.path)
        self.digests[spec.name] = (done.size, done.sha256)
        self.log.info("downloaded %s: %d bytes, sha256 %s", spec.name, done.size, done.sha256)
        return str(done.path)

    async def _run_server_once(self, want: m.ServeModel, path: str) -> bool:
        """Start llama-server, watch it until it exits, publish every state change.
        True when it exited because another process had taken its port."""
        spec, part = want.spec, want.split
        assert spec is not None
        workers = part.workers if part is not None else ()
        rpc: list[str] = []
        if workers and part is not None:
            try:
                reply = await self.bus.ask("tunnel", m.UseRpcWorkers(workers), timeout=10.0)
            except AskTimeout as exc:
                reply = m.ActorError(str(exc))
            if not isinstance(reply, m.RpcPorts) or len(reply.ports) != len(workers):
                why = f"the Tunnel opened no ports for the split's workers: {reply!r}"
                await self._set(m.LocalServerState(spec.name, state="failed", reason=why))
                return False
            rpc = split_args(
                reply.ports, part.shares, host_gpus=self.config.gpus, layers=model_layers(path)
            )
        port = free_port()
        proc = await self._spawn(self._server_command(path, spec.name, port, *rpc))
        size, sha256 = self.digests.get(spec.name, (0, ""))
        base = m.LocalServerState(
            model=spec.name,
            path=path,
            pid=proc.pid,
            port=port,
            restarts=self.policy.total,
            split=part,
            sha256=sha256,
            size=size,
        )
        try:
            await self._watch(want, base, self._await_health(port), self.log_path, "llama-server")
        finally:
            if workers:
                with contextlib.suppress(Exception):
                    await self.bus.ask("tunnel", m.UseRpcWorkers(()), timeout=5.0)
        return bind_failed(self.output, port)

    async def _spawn(
        self, cmd: list[str], env: dict[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        self.output.clear()
        self.log.info("starting %s", " ".join(redact(cmd)))
        self.proc = await spawn(cmd, env)
        return self.proc

    async def _watch(
        self,
        want: m.ServeModel,
        base: m.LocalServerState,
        became_ready: Coroutine[Any, Any, bool],
        log_path: Path,
        program: str,
    ) -> None:
        """Publish the server `base` describes loading, then ready once `became_ready`
        says so, and failed (with the telling line of its output) when it exits."""
        assert self.proc is not None
        await self._set(msgspec_replace(base, state="loading"))
        reader = asyncio.create_task(read_output(self.proc, log_path, self.output))
        try:
            if await became_ready:
                await self._set(msgspec_replace(base, state="ready"))
                self.policy.reset()
            await self.proc.wait()
            await asyncio.wait_for(reader, 2)
        finally:
            reader.cancel()
            await stop_process(self.proc)
            reason = failure_reason(self.output, self.proc.returncode, program)
            self.proc = None
        if self.want is want:
            await self._set(msgspec_replace(base, state="failed", reason=reason, port=0))

    async def _run_rpc_server_once(self, want: m.ServeModel) -> None:
        """A split worker: llama.cpp's RPC server on 127.0.0.1, until it exits."""
        spec, part = want.spec, want.split
        assert spec is not None and part is not None
        base = m.LocalServerState(model=spec.name, split=part, restarts=self.policy.total)
        binary = self.config.rpc_server
        if not binary:
            self.gave_up = spec
            why = f"cannot be a split worker: {self.config.rpc_server_missing}"
            await self._set(msgspec_replace(base, state="failed", reason=why))
            return
        port = free_port()
        cmd = rpc_server_command(binary, port, threads_arg(self.config.options.llama_args))
        # Received tensors are kept in $LLAMA_CACHE/rpc: a reload need not resend them.
        cache = Path(self.config.home) / "cache"
        proc = await self._spawn(cmd, env={**os.environ, "LLAMA_CACHE": str(cache)})
        base = msgspec_replace(base, pid=proc.pid, port=port)
        became_ready = self._await_listening(port)
        await self._watch(want, base, became_ready, self.logs / "rpc-server.log", "the RPC server")

    async def _await_listening(self, port: int) -> bool:
        """Whether the RPC server came to listen on 127.0.0.1:`port`, and there alone; a
        server that listens anywhere else is stopped at once (it has no authentication)."""
        assert self.proc is not None
        deadline = time.monotonic() + RPC_START_S
        while self.proc.returncode is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                found = listening_addresses(self.proc.pid)
                if found - {(LOOPBACK, port)}:
                    self.output.append(
                        f"error: the RPC server listens beyond 127.0.0.1:{port}: "
                        f"{sorted(found)}; stopped".encode()
                    )
                    await stop_process(self.proc)
                    return False
                if found:
                    return True
            await asyncio.sleep(HEALTH_POLL_S)
        if self.proc.returncode is None:
            self.output.append(b"error: the RPC server did not listen in time")
            await stop_process(self.proc)
        return False

    async def _await_health(self, port: int) -> bool:
        assert self.proc is not None
        return await await_health(self.proc, port, self.config.options.load_timeout_s, self.output)

    async def on_stop(self) -> None:
        if self.drain_task is not None:
            self.drain_task.cancel()
        if self.switch_task is not None:
            self.switch_task.cancel()
        await self._run_extras(())
        self.want = m.ServeModel()
        self.download_cancel.set()
        self.loop_task.cancel()
        if self.proc is not None:
            await stop_process(self.proc)
        await self._set(m.LocalServerState())


async def spawn(cmd: list[str], env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """A server process: its own session (Ctrl-C is for the root; we stop it ourselves),
    dying with this actor, its output on one pipe."""
    return await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
        env=env,
    )


async def await_health(
    proc: asyncio.subprocess.Process,
    port: int,
    timeout_s: float,
    output: collections.deque[bytes],
) -> bool:
    """Whether llama-server came to answer /health with 200 on 127.0.0.1:`port` from its
    own socket within `timeout_s`; one that did not is stopped."""
    deadline = time.monotonic() + timeout_s
    while proc.returncode is None and time.monotonic() < deadline:
        try:
            if await get_status(
                "127.0.0.1", port, "/health", timeout=2.0
            ) == 200 and listens_on_loopback(proc.pid, port):
                return True
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(HEALTH_POLL_S)
    if proc.returncode is None:
        output.append(b"error: llama-server did not become healthy in time")
        await stop_process(proc)
    return False


async def read_output(
    proc: asyncio.subprocess.Process, path: Path, output: collections.deque[bytes]
) -> None:
    """Copy a server's output to its log file, keeping the last lines in `output`."""
    assert proc.stdout is not None
    with path.open("ab") as logfile:
        while line := await _read_line(proc.stdout):
            logfile.write(line)
            logfile.flush()
            output.append(line.rstrip())


async def _read_line(stream: asyncio.StreamReader) -> bytes:
    """The next line, or its first 64 KiB when it is longer (verbose logging can be)."""
    try:
        return await stream.readline()
    except ValueError:
        return await stream.read(OUTPUT_LINE_BYTES) + b"\n"


def model_layers(path: str) -> int | None:
    """The model's layer count from its GGUF header (None when it cannot be read)."""
    from meshllm.models.files import read_gguf_header

    try:
        return read_gguf_header(path).block_count
    except (OSError, ValueError):
        return None


def msgspec_replace(base: m.LocalServerState, **changes: object) -> m.LocalServerState:
    return msgspec.structs.replace(base, **changes)
