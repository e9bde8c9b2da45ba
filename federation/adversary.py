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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from node import NodeRuntime
from node.arrays import from_record
from node.egress import train_reply
from protocols import SignedBlob, UpdateEnvelope, params_digest, sign_update, wire

_REPLAY_KEYS = ("weft.replay.arrays", "weft.replay.metrics", "weft.replay.update")


@dataclass(frozen=True)
class Adversaries:
    """A mod: corrupts the train replies of the nodes whose partition id is in `roles`."""

    roles: Mapping[int, str]
    """partition-id -> adversary kind."""
    resolve: Callable[[Context], NodeRuntime]
    """The same resolver the honest app uses (for the node's signing key)."""

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        kind = self.roles.get(int(context.node_config["partition-id"]))
        if kind is None or msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        if kind == "nonmember":
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
