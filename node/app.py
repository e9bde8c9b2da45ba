"""The node's Flower ClientApp: verify the global model, train or evaluate locally, sign, reply.

`make_client_app(resolve)` builds the app; `resolve(context)` turns Flower's context into a
`NodeRuntime` (federation/ supplies it for simulation and deployment alike).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from node.arrays import from_record
from node.egress import declared_metrics, evaluate_reply, train_reply
from node.exchange import LocalModel, exchanged_arrays
from node.instructions import PHASE_PERSONALIZE, Instructions
from node.runtime import NodeRuntime
from node.store import (
    ResidualKey,
    load_residual,
    record_round,
    save_local_model,
    save_personal_model,
    save_residual,
)
from node.training import Stats, TrainConfig, evaluate_local, train_local
from protocols import (
    DecodeError,
    EvaluationEnvelope,
    GlobalModelEnvelope,
    SignatureError,
    SignedBlob,
    UpdateEnvelope,
    open_global_model,
    params_digest,
    sign_evaluation,
    sign_update,
    structure,
    wire,
)
from protocols.payload import PAYLOADS, WEIGHTS, encode

log = logging.getLogger("weft.node")

REFUSED_MODEL = 4001
"""Error code of a reply that refuses an unsigned, mis-signed or mismatched global model."""
NODE_FAILURE = 4002
"""Error code of a reply from a node that failed while serving an instruction."""
FAILURE_REASON = "node failure; details are in the node's own log"
"""The only text a failing node sends: exception messages may hold paths or data, so they stay home."""


class RefusedModel(Exception):
    """The global model in an instruction cannot be trusted.

    `code` is a fixed word that may leave the node; the message (details) is only logged locally.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def _refusal(msg: Message, exc: RefusedModel | ValueError) -> Message:
    code = exc.code if isinstance(exc, RefusedModel) else "bad_instructions"
    log.warning("refusing %s instruction (%s): %s", msg.metadata.message_type, code, exc)
    return Message(Error(code=REFUSED_MODEL, reason=f"refused global model: {code}"), reply_to=msg)


def _guarded(
    handler: Callable[[NodeRuntime, Message], Message], resolve: Callable[[Context], NodeRuntime]
) -> Callable[[Message, Context], Message]:
    """Run `handler`; any failure is logged here and answered with a fixed code and text only."""

    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(resolve(context), msg)
        except Exception:
            log.exception("failed to serve a %s instruction", msg.metadata.message_type)
            return Message(Error(code=NODE_FAILURE, reason=FAILURE_REASON), reply_to=msg)

    return run


def make_client_app(resolve: Callable[[Context], NodeRuntime], mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp whose train/evaluate handlers run on the runtime `resolve` returns."""
    app = ClientApp(mods=list(mods))
    app.train()(_guarded(handle_train, resolve))
    app.evaluate()(_guarded(handle_evaluate, resolve))
    return app


def handle_train(rt: NodeRuntime, msg: Message) -> Message:
    """Train on the verified global model; reply with the signed update."""
    try:
        envelope, arrays = receive_global(rt, msg)
        todo = Instructions.from_config(envelope.config)
        local = _local_model(rt, todo, arrays)
    except (RefusedModel, ValueError) as exc:
        return _refusal(msg, exc)

    # ---- train locally on private data --------------------------------------------------------
    round_ = envelope.round + 1
    seed = int(np.random.SeedSequence([todo.train.seed, round_, rt.seed]).generate_state(1)[0])
    stats = train_local(local.model, rt.train_data, todo.train, rt.device, seed=seed, recipe=rt.recipe)
    trained = local.arrays()  # full precision: what the partner keeps

    # ---- the payload the signed instructions ask for (compressed against the global model) --------
    key = ResidualKey(envelope.federation_id, envelope.run_id, todo.train.payload)
    update, residual = wire_update(rt, todo.train, key, round_, arrays, trained)

    # ---- sign exactly what leaves ---------------------------------------------------------------
    metrics = declared_metrics(stats.prefixed("train"), rt.allowlist)
    signed_envelope = UpdateEnvelope(
        federation_id=envelope.federation_id,
        run_id=envelope.run_id,
        round=round_,
        sender=rt.identity.member_id,
        base_digest=envelope.model_digest,
        update_digest=params_digest(update),
        num_examples=stats.num_examples,
        metrics=metrics,
        payload=todo.train.payload,
    )
    blob = sign_update(rt.identity, signed_envelope)
    save_local_model(rt.workdir, trained, signed_envelope)
    if residual is not None:
        save_residual(rt.workdir, key, round_, residual)
    log.info(
        "round %d: sent update %s (%s, base %s), %d examples, metrics %s",
        round_, signed_envelope.update_digest.hex()[:16], todo.train.payload, envelope.model_digest.hex()[:16],
        stats.num_examples, sorted(metrics),
    )  # fmt: skip
    return Message(train_reply(update, blob, stats.num_examples, metrics), reply_to=msg)


def wire_update(
    rt: NodeRuntime,
    train: TrainConfig,
    key: ResidualKey,
    round_: int,
    base: dict[str, np.ndarray],
    trained: dict[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The arrays to send for `train.payload` (protocols/payload.py), and the residual to keep (None: keep none).

    A delta payload is the change from the global model the node received (`base`), compressed; with
    error feedback, what the previous compressed update of this run lost is added to it first.
    """
    if train.payload not in PAYLOADS:  # TrainConfig refuses it already; never send what the run did not ask
        raise ValueError(f"unknown payload kind {train.payload!r}")
    if train.payload == WEIGHTS:
        return trained, None
    previous = load_residual(rt.workdir, key, round_, structure(base)) if train.error_feedback else None
    update, residual = encode(trained, base, train.payload, previous)
    return update, residual if train.error_feedback else None


def handle_evaluate(rt: NodeRuntime, msg: Message) -> Message:
    """Evaluate the verified global model on the node's private validation split.

    After the last round the coordinator asks with phase `personalize`: the node then also trains
    a copy of the final model on its own data for `rt.personalize_epochs` epochs, keeps it in its
    work folder, and reports its validation metrics before (`eval_*`) and after (`personal_*`).
    """
    try:
        envelope, arrays = receive_global(rt, msg)
        todo = Instructions.from_config(envelope.config)
        local = _local_model(rt, todo, arrays)
    except (RefusedModel, ValueError) as exc:
        return _refusal(msg, exc)
    stats = evaluate_local(local.model, rt.val_data, rt.device, recipe=rt.recipe)
    values = stats.prefixed("eval")
    if todo.phase == PHASE_PERSONALIZE and rt.personalize_epochs > 0:
        values.update(_personalize(rt, local, todo, envelope.round).prefixed("personal"))
    metrics = declared_metrics(values, rt.allowlist)
    signed = sign_evaluation(
        rt.identity,
        EvaluationEnvelope(
            federation_id=envelope.federation_id,
            run_id=envelope.run_id,
            round=envelope.round,
            sender=rt.identity.member_id,
            model_digest=envelope.model_digest,
            num_examples=stats.num_examples,
            metrics=metrics,
        ),
    )
    return Message(evaluate_reply(stats.num_examples, metrics, signed), reply_to=msg)


def _personalize(rt: NodeRuntime, local: LocalModel, todo: Instructions, round_: int) -> Stats:
    """Fine-tune a copy of the final global model on local data; keep it; return its validation stats.

    What is kept is the trainable part (all of it, or the adapters of a LoRA run, whose base is
    the frozen one the coordinator signed).
    """
    personal = copy.deepcopy(local.model)
    config = replace(todo.train, local_epochs=rt.personalize_epochs, max_steps=0)
    seed = int(np.random.SeedSequence([config.seed, round_, rt.seed, 1]).generate_state(1)[0])
    train_local(personal, rt.train_data, config, rt.device, seed=seed, recipe=rt.recipe)
    after = evaluate_local(personal, rt.val_data, rt.device, recipe=rt.recipe)
    save_personal_model(rt.workdir, exchanged_arrays(personal, local.names), after.metrics, rt.personalize_epochs)
    log.info("personalized the final model for %d epoch(s): %s", rt.personalize_epochs, dict(after.metrics))
    return after


def _local_model(rt: NodeRuntime, todo: Instructions, arrays: dict[str, np.ndarray]) -> LocalModel:
    """The node's model with the global arrays loaded, if its frozen base is the one the coordinator signed."""
    local = rt.local_model(todo.exchange)
    if local.frozen != todo.frozen_digest:
        raise RefusedModel(
            "base_mismatch",
            f"the local frozen base has digest {local.frozen[:16]}..., the coordinator signed "
            f"{todo.frozen_digest[:16]}...: this node holds a different base model",
        )
    local.load(arrays)
    return local


def receive_global(rt: NodeRuntime, msg: Message) -> tuple[GlobalModelEnvelope, dict[str, np.ndarray]]:
    """The instruction's global model, only if the coordinator signed exactly these arrays."""
    content = msg.content
    if wire.GLOBAL_RECORD not in content.config_records:
        raise RefusedModel("unsigned", "the global model is not signed")
    record = content.config_records[wire.GLOBAL_RECORD]
    body, signature = record.get(wire.ENVELOPE), record.get(wire.SIGNATURE)
    if not isinstance(body, bytes) or not isinstance(signature, bytes):
        raise RefusedModel("malformed_envelope", "the global model's signature record is malformed")
    try:
        envelope = open_global_model(SignedBlob(body, signature), rt.coordinator_key)
    except SignatureError as exc:
        raise RefusedModel("bad_signature", "the global model is not signed by the coordinator") from exc
    except DecodeError as exc:
        raise RefusedModel("malformed_envelope", f"the global model's envelope is malformed: {exc}") from exc
    if envelope.federation_id != rt.federation_id:
        raise RefusedModel(
            "wrong_federation", f"model is for federation {envelope.federation_id!r}, not {rt.federation_id!r}"
        )
    if envelope.task != rt.task:
        raise RefusedModel("wrong_task", f"model is for task {envelope.task!r}, this node serves {rt.task!r}")
    if wire.ARRAYS not in content.array_records:
        raise RefusedModel("no_arrays", "the instruction carries no arrays")
    try:
        arrays = from_record(content.array_records[wire.ARRAYS])
        digest = params_digest(arrays)
    except Exception as exc:  # untrusted bytes: any decoding failure is a refusal
        raise RefusedModel("undecodable_arrays", f"the arrays cannot be decoded: {exc}") from exc
    if digest != envelope.model_digest:
        raise RefusedModel("digest_mismatch", "the arrays are not the ones the coordinator signed")
    newest = record_round(rt.workdir, envelope.run_id, envelope.round)
    if newest is not None and envelope.round < newest:
        raise RefusedModel("stale_model", f"model of round {envelope.round}; this node has seen round {newest}")
    return envelope, arrays
