"""Typed, validated configuration. Strings from the CLI, run_config and node_config become these
frozen dataclasses at the edge; a bad value fails at start-up with a message naming the field.

Defaults live here and nowhere else (pyproject's [tool.flwr.app.config] mirrors `RunConfig`, and a
test checks that it does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from federation.errors import ConfigError
from protocols import ConfigValue

_S = TypeVar("_S")

ADVERSARY_REASONS: dict[str, str] = {
    "tamper": "digest_mismatch",
    "unsigned": "unsigned",
    "nonmember": "unknown_member",
    "replay": "replay",
    "nan": "non_finite",
    "shape": "shape_mismatch",
    "inflate": "example_count",
}
"""Each adversary kind the coordinator must reject, and the reason it must give (`all` is one of each)."""

ACCEPTED_ADVERSARIES: tuple[str, ...] = ("signflip", "scale")
"""Compromised members whose harmful updates are validly signed and well-formed: verification accepts them
(defending against them is robust aggregation's job, not verification's)."""

FAULT_REASONS: dict[str, str] = {"die": "node_error"}
"""Faults, not attacks: `die` kills its own worker process mid-training in odd rounds (1, 3, ...), and the
coordinator records that round's missing update as `node_error`; in even rounds it trains honestly."""

ADVERSARY_OUTCOMES: dict[str, str | None] = {
    **ADVERSARY_REASONS,
    **dict.fromkeys(ACCEPTED_ADVERSARIES),
    **FAULT_REASONS,
}
"""Every kind `--adversary` takes, and what the coordinator records when it misbehaves: a reject reason,
or None when its update is accepted."""

MAX_ADVERSARIES = 1000
"""The most adversarial nodes a simulation may add (each is a member with its own key and partition)."""


def _field(default: Any, help: str) -> Any:
    """A config field with its help text (the CLI flag's help is generated from it)."""
    return field(default=default, metadata={"help": help})


LR_SCHEDULES = ("constant", "cosine")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "nesterov")
PAYLOADS = ("weights", "delta-fp16", "delta-int8", "delta-int4")
"""What a node sends: its weights, or its change to the global model in fp16, or int8/int4 codes scaled per block."""
AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "krum")
WEIGHTINGS = ("examples", "equal", "quality")
PARTITIONS = ("auto", "iid", "dirichlet", "natural")
"""auto: dirichlet when the task's pool has class labels, else natural when it has owner keys, else iid."""


@dataclass(frozen=True)
class RunConfig:
    """What a run trains and how (shared by simulation and deployment).

    Each field is a kebab-case run-config key and a `weft simulate` flag. A task may prefer other
    values (`Task.defaults`, e.g. Adam); `resolve_run_config` applies them under the user's own.
    """

    task: str = _field("digits", "built-in task (digits, synthetic, lm) or module:attr")
    model_dir: str = _field("", "causal-LM checkpoint folder the task builds on (task factories such as lm)")
    rounds: int = _field(30, "training rounds")
    local_epochs: int = _field(5, "local passes over each node's training split per round")
    max_steps: int = _field(0, "cap on local optimizer steps per round (0: none)")
    optimizer: str = _field("sgd", "local optimizer: sgd, adam or adamw")
    learning_rate: float = _field(0.1, "local learning rate (peak, when a schedule is set)")
    lr_schedule: str = _field("constant", "learning rate across rounds: constant or cosine")
    warmup_rounds: int = _field(0, "rounds of linear learning-rate warm-up")
    min_lr_ratio: float = _field(0.1, "cosine schedule: final learning rate as a fraction of the peak")
    momentum: float = _field(0.9, "SGD momentum")
    weight_decay: float = _field(0.0, "weight decay (decoupled for adamw)")
    beta1: float = _field(0.9, "Adam/AdamW beta1")
    beta2: float = _field(0.999, "Adam/AdamW beta2")
    grad_clip: float = _field(0.0, "clip local gradient norm (0: off)")
    batch_size: int = _field(32, "local mini-batch size")
    exchange: str = _field("all", "what crosses the border: all, lora (adapters over a frozen base) or subset")
    lora_rank: int = _field(8, "LoRA rank")
    lora_alpha: float = _field(16.0, "LoRA alpha")
    lora_dropout: float = _field(0.0, "LoRA dropout")
    lora_targets: str = _field("", "comma-separated module names for LoRA (empty: peft's default)")
    server_optimizer: str = _field(
        "fedavg",
        "how the aggregate moves the global model: fedavg, fedavgm (server momentum), fedadam, "
        "or nesterov (DiLoCo's outer step)",
    )
    server_learning_rate: float = _field(0.7, "outer learning rate of the fedavgm, fedadam and nesterov optimizers")
    server_momentum: float = _field(0.9, "outer momentum (fedavgm, nesterov) or first-moment decay (fedadam)")
    server_beta2: float = _field(0.99, "fedadam: second-moment decay")
    server_epsilon: float = _field(1e-3, "fedadam: adaptivity floor tau (arXiv:2003.00295)")
    fraction_train: float = _field(1.0, "fraction of the connected nodes asked to train each round (sampled)")
    min_train_nodes: int = _field(2, "fewest nodes asked to train in a round, whatever fraction-train says")
    payload: str = _field(
        "weights", "what a node sends: weights, or its change as delta-fp16, delta-int8 or delta-int4 (signed)"
    )
    error_feedback: bool = _field(True, "delta-int8/int4: carry each node's rounding error into its next update")
    seed: int = _field(0, "seed of model init, data split and shuffling")
    quorum: float = _field(0.5, "fraction of manifest members whose accepted updates a round needs")
    round_timeout_s: float = _field(600.0, "how long a round waits for replies (s)")
    aggregation: str = _field("fedavg", "how accepted updates are combined: fedavg, median, trimmed-mean or krum")
    trim: float = _field(0.2, "trimmed-mean: fraction of values dropped at each end of every coordinate")
    krum_f: int = _field(2, "krum: how many Byzantine updates to tolerate")
    krum_m: int = _field(1, "krum: how many best-scored updates to average (1: Krum, more: multi-Krum)")
    weighting: str = _field("examples", "how much an update counts: examples, equal, or quality (held-out score)")
    quality_floor: float = _field(0.0, "reject an update whose held-out target metric is worse than this (0: off)")
    max_share: float = _field(0.0, "anti-capture cap: largest share of one member in an aggregate (0: off)")
    norm_bound: float = _field(0.0, "scale down an update whose change to the global model is longer (0: off)")
    store_updates: bool = _field(True, "keep every accepted update in the record, for weft audit verify")

    def __post_init__(self) -> None:
        from node import EXCHANGES, OPTIMIZERS  # torch: imported only when a run is built

        _require(self.rounds >= 1, "rounds", "must be >= 1")
        _require(self.local_epochs >= 1, "local-epochs", "must be >= 1")
        _require(self.max_steps >= 0, "max-steps", "must be >= 0")
        _require(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        _require(math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning-rate", "must be > 0")
        _require(self.lr_schedule in LR_SCHEDULES, "lr-schedule", f"must be one of {', '.join(LR_SCHEDULES)}")
        _require(0 <= self.warmup_rounds < self.rounds, "warmup-rounds", "must be in [0, rounds)")
        _require(0 < self.min_lr_ratio <= 1, "min-lr-ratio", "must be in (0, 1]")
        _require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        _require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight-decay", "must be >= 0")
        _require(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        _require(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        _require(math.isfinite(self.grad_clip) and self.grad_clip >= 0, "grad-clip", "must be >= 0")
        _require(self.batch_size >= 1, "batch-size", "must be >= 1")
        _require(self.exchange in EXCHANGES, "exchange", f"must be one of {', '.join(EXCHANGES)}")
        _require(self.lora_rank >= 1, "lora-rank", "must be >= 1")
        _require(math.isfinite(self.lora_alpha) and self.lora_alpha > 0, "lora-alpha", "must be > 0")
        _require(0 <= self.lora_dropout < 1, "lora-dropout", "must be in [0, 1)")
        _require(self.server_optimizer in SERVER_OPTIMIZERS, "server-optimizer",
                 f"must be one of {', '.join(SERVER_OPTIMIZERS)}")  # fmt: skip
        _require(math.isfinite(self.server_learning_rate) and self.server_learning_rate > 0,
                 "server-learning-rate", "must be > 0")  # fmt: skip
        _require(0 <= self.server_momentum < 1, "server-momentum", "must be in [0, 1)")
        _require(0 <= self.server_beta2 < 1, "server-beta2", "must be in [0, 1)")
        _require(math.isfinite(self.server_epsilon) and self.server_epsilon > 0, "server-epsilon", "must be > 0")
        _require(0 < self.fraction_train <= 1, "fraction-train", "must be in (0, 1]")
        _require(self.min_train_nodes >= 1, "min-train-nodes", "must be >= 1")
        _require(self.payload in PAYLOADS, "payload", f"must be one of {', '.join(PAYLOADS)}")
        _require(0 <= self.seed < 2**63, "seed", "must be a non-negative integer")
        _require(0 < self.quorum <= 1, "quorum", "must be in (0, 1]")
        _require(self.round_timeout_s > 0, "round-timeout-s", "must be > 0")
        _require(self.aggregation in AGGREGATIONS, "aggregation", f"must be one of {', '.join(AGGREGATIONS)}")
        _require(0 <= self.trim < 0.5, "trim", "must be in [0, 0.5)")
        _require(self.krum_f >= 0, "krum-f", "must be >= 0")
        _require(self.krum_m >= 1, "krum-m", "must be >= 1")
        _require(self.weighting in WEIGHTINGS, "weighting", f"must be one of {', '.join(WEIGHTINGS)}")
        _require(math.isfinite(self.quality_floor), "quality-floor", "must be a finite number (0: off)")
        _require(0 <= self.max_share <= 1, "max-share", "must be in (0, 1], or 0 for off")
        _require(math.isfinite(self.norm_bound) and self.norm_bound >= 0, "norm-bound", "must be > 0, or 0 for off")

    def learning_rate_at(self, round_: int) -> float:
        """The learning rate of training round `round_` (1-based): warm-up, then constant or cosine."""
        if round_ <= self.warmup_rounds:
            return self.learning_rate * round_ / (self.warmup_rounds + 1)
        if self.lr_schedule == "constant":
            return self.learning_rate
        span = max(self.rounds - self.warmup_rounds - 1, 1)
        progress = (round_ - self.warmup_rounds - 1) / span
        floor = self.min_lr_ratio
        return self.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    def train_config(self, round_: int = 1) -> dict[str, ConfigValue]:
        """The training instructions of round `round_`, signed into the global model envelope before it."""
        from node import TrainConfig  # torch: imported only when a run is built

        return TrainConfig(
            local_epochs=self.local_epochs,
            max_steps=self.max_steps,
            optimizer=self.optimizer,
            learning_rate=self.learning_rate_at(round_),
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            beta1=self.beta1,
            beta2=self.beta2,
            grad_clip=self.grad_clip,
            batch_size=self.batch_size,
            seed=self.seed,
            payload=self.payload,
            error_feedback=int(self.error_feedback),
        ).to_config()

    def exchange_spec(self) -> Any:
        """The node.ExchangeSpec of this run."""
        from node import ExchangeSpec

        return ExchangeSpec(self.exchange, self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)

    def to_json(self) -> dict[str, Any]:
        """Every field by kebab-case key (recorded in summary.json)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "run config") -> RunConfig:
        """Build from kebab-case keys (Flower's run_config); unknown keys are errors, "" means not set."""
        return parse_settings(cls, values, source)


def resolve_run_config(explicit: Mapping[str, Any], task_defaults: Mapping[str, Any], source: str) -> RunConfig:
    """The run's configuration: weft's defaults, then the task's preferences, then the user's own values."""
    unknown = sorted(set(task_defaults) - {f.name.replace("_", "-") for f in fields(RunConfig)})
    if unknown:
        raise ConfigError(f"task defaults: unknown key(s) {unknown}")
    return RunConfig.from_mapping({**task_defaults, **explicit}, source)


@dataclass(frozen=True)
class SimulationConfig:
    """A simulated federation on this machine or an existing Ray cluster."""

    run: RunConfig = field(default_factory=RunConfig)
    nodes: int = _field(10, "honest nodes, each with its own partition of the pool")
    alpha: float | None = _field(0.5, "Dirichlet label-skew concentration (smaller: more skew)")
    partition: str = _field(
        "auto",
        "how the pool is split: iid, dirichlet (label skew), natural (by owner), or auto: dirichlet when the "
        "task's data has class labels, else natural when it has owners, else iid",
    )
    personalize_epochs: int = _field(0, "after the last round, each node fine-tunes the final model and keeps it")
    adversaries: Mapping[str, int] = field(default_factory=dict)
    """Extra adversarial nodes by kind (see ADVERSARY_REASONS); they never change honest data."""
    out_dir: Path = Path("runs/simulate")
    """Output folder (keys, manifest, record, plot)."""
    federation_id: str = _field("weft-sim", "federation id written into the manifest and every signature")
    ray_address: str | None = _field(None, "connect to an existing Ray cluster instead of starting one")
    cpus_per_node: float = _field(1.0, "Ray CPUs reserved per simulated node (sets how many run at once)")
    gpus_per_node: float = _field(0.0, "Ray GPUs per simulated node (0.25 shares one GPU among four)")
    federated_evaluation: bool = _field(True, "ask nodes to evaluate each global model on their validation split")
    verbose: bool = _field(False, "show Flower's and Ray's own logs")
    resume: bool = _field(False, "continue the run recorded in --out from its last completed round")

    def __post_init__(self) -> None:
        _require(self.nodes >= 1, "nodes", "must be >= 1")
        _require(self.alpha is None or (math.isfinite(self.alpha) and self.alpha > 0), "alpha", "must be > 0")
        _require(self.partition in PARTITIONS, "partition", f"must be one of {', '.join(PARTITIONS)}")
        _require(self.personalize_epochs >= 0, "personalize-epochs", "must be >= 0")
        for kind, count in self.adversaries.items():
            _require(kind in ADVERSARY_OUTCOMES, "adversary", _unknown_kind(kind))
            _require(count >= 0, "adversary", f"count for {kind!r} must be >= 0")
        _require_few_adversaries(sum(self.adversaries.values()))
        _require(self.cpus_per_node > 0, "cpus-per-node", "must be > 0")
        _require(self.gpus_per_node >= 0, "gpus-per-node", "must be >= 0")

    def to_json(self) -> dict[str, Any]:
        """The simulation's own settings (the run's are in `run`), for summary.json."""
        return {
            "nodes": self.nodes,
            "partition": self.partition,
            "alpha": self.alpha if self.partition == "dirichlet" else None,
            "adversaries": dict(self.adversaries),
            "federated-evaluation": self.federated_evaluation,
            "personalize-epochs": self.personalize_epochs,
            "federation-id": self.federation_id,
        }

    @property
    def adversary_kinds(self) -> list[str]:
        """One entry per adversarial node, in a fixed order."""
        return [kind for kind in ADVERSARY_OUTCOMES for _ in range(self.adversaries.get(kind, 0))]


@dataclass(frozen=True)
class NodeSettings:
    """A deployed node's settings, from `flower-supernode --node-config` (docs/DEPLOY.md)."""

    key: Path
    """The partner's private signing key (weft keygen)."""
    coordinator_key: Path
    """The coordinator's public key: the only key global models are trusted from."""
    federation_id: str
    """The federation this node serves."""
    workdir: Path
    """Where the node keeps its latest local (and personalized) model."""
    data_dir: Path
    """The partner's own data folder, read by the task's local data recipe; it never leaves the node."""
    task: str = "digits"
    """Built-in name or module:attr: the same task as the run's."""
    model_dir: Path | None = None
    """A checkpoint folder the partner holds, for task factories such as lm."""
    personalize_epochs: int = 0
    """Local epochs of fine-tuning on the final model (kept by the partner) when the run asks for it."""
    seed: int = 0
    """Node-local seed mixed into the round's shuffling seed."""
    device: str = "auto"
    """auto, cpu or cuda[:N]."""
    jurisdiction: str = ""
    """Where this node's data lives (e.g. DE), as the manifest records it; logged at start-up."""

    def __post_init__(self) -> None:
        _require(self.personalize_epochs >= 0, "personalize-epochs", "must be >= 0")
        _require(0 <= self.seed < 2**63, "seed", "must be a non-negative integer")

    @classmethod
    def from_node_config(cls, values: Mapping[str, Any]) -> NodeSettings:
        """Parse Flower's node_config ("" counts as not set); errors name the key."""
        return parse_settings(cls, values, "node config")


@dataclass(frozen=True)
class DeploymentSettings:
    """Operator-side settings of a deployed run, from `--run-config` (besides RunConfig's keys)."""

    manifest: Path
    """The federation manifest (JSON)."""
    coordinator_key: Path
    """The coordinator's private key."""
    out_dir: Path
    """Folder for the run's record."""
    run_id: str = ""
    """The run's id; a fresh one is generated when empty."""
    personalize: bool = False
    """After the last round, ask every node to fine-tune the final model locally and report before/after."""
    federated_evaluation: bool = True
    """Ask every node to evaluate each new global model on its own validation split."""
    resume: bool = False
    """Continue the run recorded in `out_dir` from its last committed round (`weft coordinator start --resume`)."""


def parse_adversaries(text: str) -> dict[str, int]:
    """Parse `tamper=1,unsigned=2` (or `all` for one of each kind the coordinator must reject).

    Counts are decimal integers >= 0 and add up to at most MAX_ADVERSARIES.
    """
    if not text.strip():
        return {}
    if text.strip() == "all":
        return dict.fromkeys(ADVERSARY_REASONS, 1)
    out: dict[str, int] = {}
    for item in text.split(","):
        kind, sep, count = (part.strip() for part in item.partition("="))
        _require(
            bool(sep) and count.isascii() and count.isdigit(), "adversary", f"expected kind=count, got {item.strip()!r}"
        )
        _require(kind not in out, "adversary", f"kind {kind!r} given twice")
        _require(kind in ADVERSARY_OUTCOMES, "adversary", _unknown_kind(kind))
        # compare digits first: int() of a 5000-digit string raises, and a huge count must not reach the simulation
        digits = count.lstrip("0") or "0"
        shown = digits if len(digits) <= 12 else f"{digits[:12]}..."
        _require(
            len(digits) <= len(str(MAX_ADVERSARIES)) and int(digits) <= MAX_ADVERSARIES,
            "adversary",
            f"count {shown} for {kind!r} is too large; use at most {MAX_ADVERSARIES} adversarial nodes in total",
        )
        out[kind] = int(digits)
    _require_few_adversaries(sum(out.values()))
    return out


def _unknown_kind(kind: str) -> str:
    return f"unknown kind {kind!r}; choose from {', '.join(ADVERSARY_OUTCOMES)}"


def _require_few_adversaries(total: int) -> None:
    _require(
        total <= MAX_ADVERSARIES,
        "adversary",
        f"{total} adversarial nodes in total; use at most {MAX_ADVERSARIES} (lower the counts)",
    )


# ---- helpers ---------------------------------------------------------------------------------------


def _require(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {problem}")


def parse_settings(cls: type[_S], values: Mapping[str, Any], source: str) -> _S:
    """The one parser of every settings dataclass: kebab-case keys from Flower's string-keyed configs.

    Unknown and missing required keys are errors; "" means "not set" (the field's default applies);
    each value must be, or spell, the field's type (str, int, float, bool, Path, or optional ones).
    Every message names `source` and the key.
    """
    prefix = f"{source}: " if source else ""
    hints = get_type_hints(cls)
    by_key = {f.name.replace("_", "-"): f for f in fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in values.items() if v != ""}
    unknown = sorted(set(values) - set(by_key))
    if unknown:
        raise ConfigError(f"{prefix}unknown key(s) {unknown}; known keys: {sorted(by_key)}")
    missing = sorted(k for k, f in by_key.items() if k not in values and _required(f))
    if missing:
        raise ConfigError(f"{prefix}missing required key(s) {missing}")
    kwargs = {by_key[k].name: _coerce(v, hints[by_key[k].name], f"{prefix}{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from exc


def _required(f: Field[Any]) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as the type `hint` names (X | None accepts what X accepts); else a ConfigError naming `where`."""
    options = [t for t in get_args(hint) if t is not type(None)] if get_origin(hint) in (Union, UnionType) else [hint]
    want = options[0]
    name = getattr(want, "__name__", str(want))
    if isinstance(value, bool) and want is not bool:
        raise ConfigError(f"{where}: expected {name}, got a boolean")
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif want is int:
        if isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
            return int(value)
    elif want is float:
        try:
            if isinstance(value, int | float | str):
                return float(value)
        except ValueError:
            pass
    elif want is str:
        if isinstance(value, str):
            return value
    elif want is Path and isinstance(value, str | Path):
        return Path(value)
    raise ConfigError(f"{where}: expected {name}, got {value!r}")
