"""weft's Ray backend for Flower's simulation engine: survives dying nodes, and leaves no process behind.

What Flower 1.42 does when a node's worker process dies mid-message
-------------------------------------------------------------------
The simulation engine (flwr/server/superlink/fleet/vce/vce_api.py) runs one worker thread per Ray
actor; each thread takes an instruction, and `RayBackend.process_message` pops an idle actor from a
`BasicActorPool`, runs the ClientApp on it and `ray.get`s the result. An actor is one worker process
that serves many simulated nodes, one message at a time. When that process dies, `ray.get` raises
`ActorDiedError`; `process_message` puts the *dead* actor back into the pool and re-raises, and the
worker thread turns the exception into an error reply (so the dying node's own message is answered at
once, with two tracebacks in the log). But the dead actor stays in the pool: every later message it
is given fails at once the same way, so the next round misses its quorum with a traceback per node.

What this backend does instead
------------------------------
`WeftRayBackend.process_message` runs the message the same way; when the actor died, it drops it,
starts a fresh actor in its place (the pool keeps its size, so every worker thread still finds an
idle actor), and answers the message with an error reply, code `NODE_DIED`, which the coordinator
records as a rejected `node_error` without waiting for the round's timeout. The simulated node itself
is not lost: its next message runs on a healthy actor (node state such as keys and data is rebuilt
from disk by the resolver).

It also starts Ray under a `federation.reaper.Reaper`, so that no process of the run's Ray outlives
`weft simulate`, however it ends.

Handing instructions to the workers in time linear in the messages
-----------------------------------------------------------------------
Flower 1.42's engine (`vce_api.add_messages_to_queue`) asks the link state, every 0.1 s, for one
instruction per registered node: `get_message_ins(node_id, limit=1)` for each of the N nodes, and each
call scans every stored instruction under the state's lock. That is N x M work per sweep (5,000 nodes x
250 instructions when 5% are sampled), which holds the lock and the interpreter against the coordinator
and the replies coming back. `_dispatch` does the same in one pass over the stored instructions: the
first undelivered one of each node, checked (`_check_stored_messages`) and marked delivered exactly as
`get_message_ins` does. With any other link state it falls back to Flower's own loop.

Flower creates its backend in `vce_api.start_vce` with `from .backend.raybackend import RayBackend`,
with no registry to add one to: `use_weft_backend()` points that name at `WeftRayBackend` (an
ordinary subclass; everything else is Flower's). It is pinned to Flower 1.42's `RayBackend` and
`BasicActorPool`, whose layout it relies on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from queue import Queue
from typing import Any

import ray
from flwr.app import Context, Error, Message
from flwr.common.constant import PARTITION_ID_KEY
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.server.superlink.fleet.vce.backend.backend import BackendConfig
from flwr.simulation.ray_transport.ray_actor import BasicActorPool
from flwr.supercore.date import now
from ray.exceptions import RayActorError

from federation.reaper import Reaper

log = logging.getLogger("weft.simulation")

NODE_DIED = 4003
"""Error code of the reply the backend sends for a node whose worker process died while serving it."""
NODE_DIED_REASON = "node process died while serving the instruction"
"""The reply's text (a fixed string: nothing from the node's process)."""

_FLOWER_BACKEND = raybackend.RayBackend
_FLOWER_DISPATCH = vce_api.add_messages_to_queue


class WeftRayBackend(_FLOWER_BACKEND):
    """Flower's RayBackend, plus: a dead actor is replaced and its message answered with an error."""

    def __init__(self, backend_config: BackendConfig) -> None:
        # A run that starts its own local Ray tags every Ray process, so a watchdog can reap them.
        self.reaper: Reaper | None = None
        if not ray.is_initialized() and backend_config.get("init_args", {}).get("address", "local") == "local":
            self.reaper = Reaper.start()
        if self.reaper is None:
            super().__init__(backend_config)
            return
        try:
            with self.reaper.tagged():
                super().__init__(backend_config)  # ray.init() spawns gcs_server, raylet, ... here
            session = _session_dir()
            if session:
                self.reaper.report_session(session)
        except BaseException:
            self.reaper.close()
            raise

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Run the ClientApp on an idle actor; if the actor's process dies, replace it and reply with an error."""
        if self.pool is None or self.app_fn is None:
            return super().process_message(message, context)  # raises Flower's own errors
        pool = self.pool
        partition_id = context.node_config[PARTITION_ID_KEY]
        future = pool.submit(
            lambda actor, app_fn, msg, cid, ctx: actor.run.remote(app_fn, msg, cid, ctx),
            (self.app_fn, message, str(partition_id), context),
        )
        try:
            out, updated = pool.fetch_result_and_return_actor_to_pool(future)
        except RayActorError as exc:
            self._replace(pool, future, exc)
            return Message(Error(code=NODE_DIED, reason=NODE_DIED_REASON), reply_to=message), context
        except BaseException:
            pool.add_actor_back_to_pool(future)  # a ClientApp exception: the actor is fine
            raise
        return out, updated

    @staticmethod
    def _replace(pool: BasicActorPool, future: Any, exc: RayActorError) -> None:
        """Drop the dead actor that ran `future` and add a fresh one to the pool."""
        dead: Any = pool._future_to_actor.pop(future)  # Flower 1.42's BasicActorPool: future -> actor
        with contextlib.suppress(Exception):  # already gone: nothing to kill
            ray.kill(dead)
        pool.pool.append(pool.create_actor_fn())
        log.warning("a simulated node's worker process died (%s); started a fresh one", type(exc).__name__)

    def terminate(self) -> None:
        """Flower's shutdown (actors, then ray.shutdown()), then reap whatever of this run's Ray is left."""
        try:
            super().terminate()
        finally:
            if self.reaper is not None:
                left = self.reaper.close()
                if left:
                    log.info("stopped %d Ray process(es) left after shutdown: %s", len(left), left)


def use_weft_backend() -> None:
    """Make Flower's simulation engine build `WeftRayBackend` and hand out instructions with `_dispatch`
    (idempotent; lasts for the process)."""
    raybackend.RayBackend = WeftRayBackend  # type: ignore[misc]
    vce_api.add_messages_to_queue = _dispatch


def _dispatch(state: Any, queue: Queue[Message], nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Flower's `add_messages_to_queue`, in one pass over the stored instructions per sweep."""
    if not hasattr(state, "message_ins_store") or not hasattr(state, "_check_stored_messages"):
        _FLOWER_DISPATCH(state, queue, nodes_mapping, f_stop)  # another LinkState: Flower's own loop
        return
    while not f_stop.is_set():
        for message in _next_instructions(state, nodes_mapping):
            queue.put(message)
        f_stop.wait(0.1)


def _next_instructions(state: Any, nodes: dict[int, int]) -> list[Message]:
    """The first undelivered instruction of every simulated node, marked delivered (as `get_message_ins`
    with `limit=1` marks it), in the order they were stored."""
    with state.lock:
        store = state.message_ins_store
        state._check_stored_messages(set(store))  # drops expired ones, as get_message_ins does for each
        first: dict[int, Message] = {}
        for message in store.values():
            meta = message.metadata
            if meta.delivered_at == "" and meta.dst_node_id in nodes and meta.dst_node_id not in first:
                first[meta.dst_node_id] = message
        delivered_at = now().isoformat()
        for message in first.values():
            message.metadata.delivered_at = delivered_at
    return list(first.values())


def _session_dir() -> str | None:
    """The folder of the Ray session this process started (Ray 2.x's private API; None if it moved)."""
    node = getattr(ray._private.worker, "_global_node", None)
    getter = getattr(node, "get_session_dir_path", None)
    try:
        return str(getter()) if callable(getter) else None
    except Exception:  # an unexpected Ray version: the token still marks most processes
        return None
