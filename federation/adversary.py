"""Adversarial nodes for simulation, as one Flower mod around the honest ClientApp.

Each adversary trains honestly first and then corrupts its reply the way a faulty or malicious
partner would. Kinds and the reason the coordinator must give (federation.config.ADVERSARY_REASONS):

- tamper:    changes array bytes after signing                     -> digest_mismatch
- unsigned:  strips the signed envelope                            -> unsigned
- nonmember: signs honestly with a key that is not in the manifest -> unknown_member
             (no corruption needed: the simulation leaves its key out of the manifest)
- replay:    re-sends its reply from the previous round; in round 1, where no earlier round
             exists, it sends its work signed for round 0, as a captured old reply would be
                                                                   -> replay
- nan:       puts NaN into its update and signs it                 -> non_finite
- shape:     drops a row of its first matrix and signs it          -> shape_mismatch
- inflate:   claims 1000x its example count and signs it           -> example_count

Validly signed, well-formed and harmful: the coordinator accepts them (robust aggregation's job):

- signflip:  negates its update against the global model it got:   sent = global - (trained - global)
- scale:     boosts its update 100x:                               sent = global + 100 * (trained - global)
             (both change floating-point arrays only; integer arrays such as counters are sent as trained)

A fault rather than an attack (federation.config.FAULT_REASONS):

- die:       in odd rounds (1, 3, ...) kills its own worker process with SIGKILL after its first local
             optimizer step, so no reply is ever sent; the simulation's backend
             (federation/sim_backend.py) answers for it with an error (-> node_error) and starts a fresh
             worker. In even rounds it trains honestly and its update is accepted.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from torch.optim.optimizer import register_optimizer_step_post_hook

from node import NodeRuntime
from node.arrays import from_record
from node.egress import train_reply
from protocols import DecodeError, GlobalModelEnvelope, SignedBlob, UpdateEnvelope, params_digest, sign_update, wire

log = logging.getLogger("weft.adversary")

_REPLAY_KEYS = ("weft.replay.arrays", "weft.replay.metrics", "weft.replay.update")
SCALE_FACTOR = 100.0
"""How much the `scale` adversary boosts its update."""


@dataclass(frozen=True)
class Adversaries:
    """A mod: corrupts the train replies of the nodes whose partition id is in `roles`."""

    roles: Mapping[int, str]
    """partition-id -> adversary kind."""
    resolve: Callable[[Context], NodeRuntime]
    """The same resolver the honest app uses (for the node's signing key)."""

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        kind = self.roles.get(int(context.node_config["partition-id"]))
        if kind == "die" and msg.metadata.message_type == MessageType.TRAIN and dies_in(_round_of(msg)):
            _die_mid_training(msg, context, call_next)
        reply = call_next(msg, context)
        # nonmember signs honestly (its key is simply not in the manifest); die is honest when it lives
        if kind in (None, "nonmember", "die") or msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        if kind == "replay":
            return _replay(msg, reply, context, self.resolve(context))
        if kind == "unsigned":
            content = RecordDict({k: v for k, v in reply.content.items() if k != wire.UPDATE_RECORD})
            return Message(content, reply_to=msg)
        if kind == "tamper":
            arrays = from_record(reply.content.array_records[wire.ARRAYS])
            first = sorted(arrays)[0]
            arrays[first] = arrays[first] + np.asarray(0.5, dtype=arrays[first].dtype)
            return _with_arrays(msg, reply, arrays)
        return _resign(msg, reply, self.resolve(context), kind)


def _resign(msg: Message, reply: Message, rt: NodeRuntime, kind: str) -> Message:
    """Corrupt the update, then sign it properly: a compromised member, not a forger."""
    env, arrays = _open(reply)
    if kind == "nan":
        name = next(n for n in sorted(arrays) if arrays[n].dtype.kind == "f")
        arrays[name] = arrays[name].copy()
        arrays[name].flat[0] = np.nan
    elif kind == "shape":
        name = next(n for n in sorted(arrays) if arrays[n].ndim == 2)
        arrays[name] = arrays[name][:-1]
    elif kind == "inflate":
        env = replace(env, num_examples=env.num_examples * 1000)
    elif kind in ("signflip", "scale"):
        factor = -1.0 if kind == "signflip" else SCALE_FACTOR
        arrays = corrupt_delta(from_record(msg.content.array_records[wire.ARRAYS]), arrays, factor)
    else:
        raise ValueError(f"unknown adversary kind {kind!r}")
    env = replace(env, update_digest=params_digest(arrays))
    return Message(train_reply(arrays, sign_update(rt.identity, env), env.num_examples, env.metrics), reply_to=msg)


def _replay(msg: Message, reply: Message, context: Context, rt: NodeRuntime) -> Message:
    """Send the previous round's reply (stored in the node's context) and keep this one for later."""
    state = context.state
    if all(key in state for key in _REPLAY_KEYS):
        old = RecordDict(
            {
                wire.ARRAYS: state[_REPLAY_KEYS[0]],
                wire.METRICS: state[_REPLAY_KEYS[1]],
                wire.UPDATE_RECORD: state[_REPLAY_KEYS[2]],
            }
        )
        out = Message(old, reply_to=msg)
    else:  # round 1: nothing captured yet, so send this work signed for round 0
        env, arrays = _open(reply)
        stale = replace(env, round=env.round - 1)
        out = Message(train_reply(arrays, sign_update(rt.identity, stale), env.num_examples, env.metrics), reply_to=msg)
    state[_REPLAY_KEYS[0]] = reply.content.array_records[wire.ARRAYS]
    state[_REPLAY_KEYS[1]] = reply.content.metric_records[wire.METRICS]
    state[_REPLAY_KEYS[2]] = reply.content.config_records[wire.UPDATE_RECORD]
    return out


def _with_arrays(msg: Message, reply: Message, arrays: dict[str, np.ndarray]) -> Message:
    """The same signed envelope and metrics, but different arrays."""
    record = reply.content.config_records[wire.UPDATE_RECORD]
    signed = SignedBlob(record[wire.ENVELOPE], record[wire.SIGNATURE])  # type: ignore[arg-type]
    env = UpdateEnvelope.decode(signed.body)
    return Message(train_reply(arrays, signed, env.num_examples, env.metrics), reply_to=msg)


def _open(reply: Message) -> tuple[UpdateEnvelope, dict[str, np.ndarray]]:
    record = reply.content.config_records[wire.UPDATE_RECORD]
    env = UpdateEnvelope.decode(record[wire.ENVELOPE])  # type: ignore[arg-type]
    return env, from_record(reply.content.array_records[wire.ARRAYS])


def corrupt_delta(
    global_arrays: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], factor: float
) -> dict[str, np.ndarray]:
    """`global + factor * (trained - global)` for each floating-point array, in its own dtype.

    Integer arrays (e.g. batch-norm counters) and arrays the global model does not hold are kept as trained.
    """
    out: dict[str, np.ndarray] = {}
    for name, array in trained.items():
        base = global_arrays.get(name)
        if array.dtype.kind != "f" or base is None or base.shape != array.shape:
            out[name] = array
            continue
        base = base.astype(array.dtype, copy=False)
        out[name] = (base + array.dtype.type(factor) * (array - base)).astype(array.dtype, copy=False)
    return out


def dies_in(round_: int | None) -> bool:
    """Whether a `die` node dies in this round: odd rounds (1, 3, ...); never when the round is unknown."""
    return round_ is not None and round_ % 2 == 1


def _round_of(msg: Message) -> int | None:
    """The round an instruction starts (its global model's round + 1), read without verifying anything."""
    record = msg.content.config_records.get(wire.GLOBAL_RECORD)
    body = record.get(wire.ENVELOPE) if record is not None else None
    if not isinstance(body, bytes):
        return None
    try:
        return GlobalModelEnvelope.decode(body).round + 1
    except DecodeError:
        return None


def _die_mid_training(msg: Message, context: Context, call_next: ClientAppCallable) -> NoReturn:
    """Train, and kill this worker process after the first optimizer step: a real process death, no reply.

    When the task's training never steps a torch optimizer, the process dies after training instead,
    still before any reply leaves. Never returns.
    """

    def die(*_: Any) -> NoReturn:
        log.warning("round %s: simulated failure: killing worker process %d", _round_of(msg), os.getpid())
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        raise SystemExit(1)  # unreachable: SIGKILL cannot be caught

    hook = register_optimizer_step_post_hook(die)
    try:
        call_next(msg, context)
    finally:
        hook.remove()  # only reached when dying failed (a test's stand-in for os.kill): keep other training safe
    die()
