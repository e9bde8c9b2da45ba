"""The `weft` command line. Thin: parse, build typed config, run, report.

User mistakes (bad flags, config, keys, manifests, task paths) end with one line naming the
field and exit code 2; a run that fails (e.g. a missed quorum) ends with exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from federation.config import RunConfig, SimulationConfig, parse_adversaries
from federation.errors import ConfigError, TaskError
from federation.flags import add_flags, given
from federation.preflight import check_gpus, check_ray_address, check_writable_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `weft` console script."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, TaskError, FileExistsError) as exc:
        print(f"weft: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        # a user's file or folder the command was pointed at; other OSErrors are not assumed to be the user's
        print(f"weft: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:
        print(
            f"weft: error: a file given is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "check the paths passed to this command",
            file=sys.stderr,
        )
        return 2
    except Exception as exc:
        from protocols import ProtocolError

        if isinstance(exc, ProtocolError):
            print(f"weft: error: {_one_line(str(exc))}", file=sys.stderr)
            return 2
        raise


def _one_line(message: str) -> str:
    """`message` on one line (a user's exception text may span several)."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _os_error(exc: OSError) -> str:
    """`FILE: reason; fix` for an OSError about a path the user gave."""
    where = exc.filename if exc.filename is not None else "a path given"
    reason = exc.strerror or type(exc).__name__
    fixes = {
        PermissionError: "check its permissions or choose another path",
        FileNotFoundError: "check the path",
        IsADirectoryError: "give a file, not a folder",
        NotADirectoryError: "a part of the path is a file, not a folder; check the path",
    }
    fix = next((text for kind, text in fixes.items() if isinstance(exc, kind)), "check the path")
    return _one_line(f"{where}: {reason}; {fix}")


# ---- simulate ------------------------------------------------------------------------------------------


def _simulate(args: argparse.Namespace) -> int:
    from coordinator import NotEnoughNodes, QuorumNotReached, RecordError, mark_interrupted
    from federation.plots import plot_metrics, run_title
    from federation.progress import RoundProgress
    from federation.runtime import resolve_run
    from federation.simulation import resolve_partition, simulate

    sys.path.insert(0, os.getcwd())  # user task modules next to where weft is run (Ray inherits it)
    explicit = _explicit_run_values(args)
    if explicit.get("model-dir"):  # recorded absolute, so `weft export` finds the base from anywhere
        explicit["model-dir"] = str(Path(str(explicit["model-dir"])).resolve())
    out = Path(args.out) if args.out else Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")
    check_writable_dir(out, "out")  # before any work: an unwritable --out fails now, not after the first round
    # fail on a bad task path before Ray starts; the task's preferred settings sit under the user's flags
    task, run = resolve_run(explicit, source="")
    sim = given(args, SimulationConfig, "sim_")
    if args.iid:
        sim["partition"] = "iid"
    if sim.get("partition") == "iid":
        sim["alpha"] = None
    cfg = SimulationConfig(run=run, adversaries=parse_adversaries(args.adversary), out_dir=out, **sim)
    check_gpus(cfg.gpus_per_node)  # both before Ray starts: Ray would wait forever for a GPU or a cluster
    check_ray_address(cfg.ray_address)
    cfg = resolve_partition(cfg)  # loads the task's data once (cached for the run)
    title = run_title(cfg.run.to_json(), cfg.to_json())
    print(f"weft simulate: {title}, adversaries: {', '.join(cfg.adversary_kinds) or 'none'} -> {out}", file=sys.stderr)
    with RoundProgress(run.rounds, target=task.recipe.target) as progress:
        try:
            result = simulate(cfg, observer=progress)
        except (QuorumNotReached, NotEnoughNodes) as exc:
            print(f"weft: run failed: {exc}", file=sys.stderr)
            return 1
        except RecordError as exc:
            print(f"weft: error: {_one_line(str(exc))}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            # Ray is already shut down by now; Flower's ServerApp thread would hold the process until its round
            # timeout, so leave at once, with the record saying what happened.
            mark_interrupted(out)
            print(f"weft: interrupted; continue with the same command and --resume (record: {out})", file=sys.stderr)
            sys.stderr.flush()
            os._exit(130)
    plot = plot_metrics(out / "metrics.jsonl", out / "metrics.png", title=f"weft simulate: {title}")
    summary = dict(result.summary)
    print(json.dumps(summary, indent=2, sort_keys=True))
    print(f"record: {out}/  (metrics.jsonl, summary.json, global_model.npz, plot {plot.name})", file=sys.stderr)
    return 0


def _explicit_run_values(args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig values the user gave as flags (kebab-case keys); the rest come from the task or weft."""
    return {name.replace("_", "-"): value for name, value in given(args, RunConfig, "run_").items()}


# ---- keys and models ------------------------------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> int:
    """`weft keygen`: the first spelling of `weft keys new` (without --kind: the Ed25519 pair only)."""
    return _keys_new(args)


def _keys_new(args: argparse.Namespace) -> int:
    from protocols import ID_PATTERN, SigningKey, create_flower_auth_key, save_public_key, save_signing_key

    if not ID_PATTERN.fullmatch(args.name):
        raise ConfigError(f"name: {args.name!r} is not a valid file name stem (1-128 characters of A-Z a-z 0-9 . _ -)")
    out = Path(args.out)
    key_path, pub_path = out / f"{args.name}.key", out / f"{args.name}.pub"
    flower = (out / f"{args.name}.flower.key", out / f"{args.name}.flower.pub") if args.kind == "node" else None
    for path in (key_path, pub_path, *(flower or ())):
        if path.exists():  # nothing is written unless every file is new
            raise FileExistsError(f"{path} already exists; refusing to overwrite a key")
    check_writable_dir(out, "out")
    key = SigningKey.generate()
    save_signing_key(key, key_path)
    save_public_key(key.public_key, pub_path)
    print(f"member id {key.member_id}: {key_path} (private, mode 600), {pub_path}")
    if flower:
        create_flower_auth_key(*flower, comment=args.name)
        print(
            f"Flower auth key (ECDSA P-384, OpenSSH): {flower[0]} (private, mode 600; flower-supernode "
            f"--auth-supernode-private-key), {flower[1]} (flwr supernode register; weft manifest add --flower-auth-key)"
        )
    return 0


def _verify_model(args: argparse.Namespace) -> int:
    from protocols import load_public_key, read_signed_model

    model = read_signed_model(Path(args.model), load_public_key(Path(args.coordinator_key)))
    env = model.envelope
    print(
        f"OK: signed by the coordinator; federation {env.federation_id}, run {env.run_id}, "
        f"round {env.round}, task {env.task}, digest {env.model_digest.hex()}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from federation.export import export_run

    sys.path.insert(0, os.getcwd())  # the run's task module may sit next to where weft is run
    key = Path(args.coordinator_key) if args.coordinator_key else None
    result = export_run(Path(args.run_dir), Path(args.out), coordinator_key=key, adapters_only=args.adapters_only)
    tokenizer = " with its tokenizer" if result.tokenizer else ""
    print(
        f"exported {result.exported} of run {result.run_id} (federation {result.federation_id}, round {result.round}, "
        f"digest {result.model_digest[:16]}){tokenizer} -> {result.out}"
    )
    return 0


def _manifest_init(args: argparse.Namespace) -> int:
    from protocols import Manifest, load_public_key, load_signing_key

    path = Path(args.manifest)
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    check_writable_dir(path.parent, "manifest")
    key = load_signing_key(Path(args.coordinator_key_file))
    if args.coordinator_key and load_public_key(Path(args.coordinator_key)) != key.public_key:
        raise ConfigError(
            f"coordinator-key: {args.coordinator_key} is not the public half of {args.coordinator_key_file}"
        )
    manifest = Manifest(args.federation_id, key.public_key, ()).save(path, key)  # validated before it is written
    print(
        f"created {path} (version {manifest.version}) for federation {manifest.federation_id}, signed by coordinator "
        f"{key.member_id} (no members yet: add them with `weft manifest add`)"
    )
    return 0


def _manifest_add(args: argparse.Namespace) -> int:
    from protocols import Member, load_flower_auth_public_key, load_public_key

    path, key, manifest = _manifest_for_edit(args)
    flower = load_flower_auth_public_key(Path(args.flower_auth_key)) if args.flower_auth_key else ""
    member = Member(args.name, load_public_key(Path(args.key)), args.jurisdiction, args.max_examples,
                    flower_auth_key=flower)  # fmt: skip
    manifest = manifest.with_member(member).save(path, key)
    who = f"{member.name} (member id {member.member_id}, {member.jurisdiction})"
    print(f"added {who} to {path}: version {manifest.version}")
    return 0


def _manifest_suspend(args: argparse.Namespace) -> int:
    return _manifest_status(args, "suspended")


def _manifest_reinstate(args: argparse.Namespace) -> int:
    return _manifest_status(args, "active")


def _manifest_revoke(args: argparse.Namespace) -> int:
    return _manifest_status(args, "revoked")


def _manifest_status(args: argparse.Namespace, status: str) -> int:
    path, key, manifest = _manifest_for_edit(args)
    member = manifest.find(args.member)
    manifest = manifest.with_status(member.member_id, status).save(path, key)
    print(f"{member.name} (member id {member.member_id}) is now {status} in {path}: version {manifest.version}")
    return 0


def _manifest_for_edit(args: argparse.Namespace) -> tuple[Path, Any, Any]:
    """(path, coordinator signing key, current manifest): the manifest must be signed by that very key."""
    from protocols import Manifest, load_signing_key

    key = load_signing_key(Path(args.coordinator_key_file))
    path = Path(args.manifest)
    manifest = Manifest.load(path, coordinator_key=key.public_key)
    check_writable_dir(path.parent, "manifest")  # the next version is written beside it, then renamed over it
    return path, key, manifest


def _manifest_show(args: argparse.Namespace) -> int:
    from protocols import Manifest, load_public_key

    trusted = load_public_key(Path(args.coordinator_key)) if args.coordinator_key else None
    manifest = Manifest.load(Path(args.manifest), coordinator_key=trusted)
    check = "the given coordinator key" if trusted else "its own coordinator key (pass --coordinator-key to pin it)"
    print(
        f"{args.manifest}: federation {manifest.federation_id}, version {manifest.version}, "
        f"coordinator {manifest.coordinator_key.member_id}; signature verified under {check}"
    )
    for m in manifest:
        flower = "flower-auth yes" if m.flower_auth_key else "flower-auth no"
        print(f"  {m.member_id}  {m.name}  {m.jurisdiction}  {m.status}  max-examples {m.max_examples}  {flower}")
    return 0


# ---- parser -------------------------------------------------------------------------------------------------


FLAG_ALIASES = {"learning_rate": ["--lr"], "federated_evaluation": ["--no-federated-eval"]}
"""Short spellings kept from the first edition of the CLI."""
SIM_FLAGS = ("nodes", "partition", "alpha", "personalize_epochs", "federation_id", "ray_address", "cpus_per_node",
             "gpus_per_node", "federated_evaluation", "verbose", "resume")  # fmt: skip
"""SimulationConfig fields that are plain flags (adversaries and out_dir have their own syntax)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weft", description="Consortium training with signed contributions.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    sim = sub.add_parser(
        "simulate",
        help="run N nodes (and adversaries) on Flower's Ray simulation engine",
        description="Every run setting below is a field of the typed run config (federation/config.py). "
        "Unset flags take the task's preferred value (e.g. digits prefers Adam), else weft's default.",
    )
    add_flags(sim.add_argument_group("run settings (federation.config.RunConfig)"), RunConfig,
              prefix="run_", aliases=FLAG_ALIASES)  # fmt: skip
    add_flags(sim.add_argument_group("simulation (federation.config.SimulationConfig)"), SimulationConfig,
              SIM_FLAGS, prefix="sim_", aliases=FLAG_ALIASES)  # fmt: skip
    sim.add_argument("--iid", action="store_true", help="same as --partition iid")
    sim.add_argument(
        "--adversary",
        default="",
        help="extra adversarial nodes, e.g. tamper=1,unsigned=1 or 'all' "
        "(rejected: tamper, unsigned, nonmember, replay, nan, shape, inflate; validly signed poison: signflip, "
        "scale; faults: die, a node whose process dies mid-round in odd rounds)",
    )
    sim.add_argument("--out", help="output folder (default: runs/sim-<timestamp>)")
    sim.set_defaults(func=_simulate)

    keys = sub.add_parser("keys", help="create key pairs")
    keys_sub = keys.add_subparsers(required=True, metavar="ACTION")
    kn = keys_sub.add_parser(
        "new",
        help="create an Ed25519 key pair (NAME.key, NAME.pub); for a node also its Flower auth key pair",
        description="Private keys are written with mode 600 and never overwritten. --kind node also writes "
        "NAME.flower.key / NAME.flower.pub: the node's Flower SuperNode auth key pair (ECDSA P-384, OpenSSH).",
    )
    kn.add_argument("--kind", required=True, choices=("node", "coordinator"), help="whose keys these are")
    kn.add_argument("--out", required=True, help="folder for the key files")
    kn.add_argument("--name", required=True, help="file name stem, e.g. hospital-a")
    kn.set_defaults(func=_keys_new)
    kg = sub.add_parser("keygen", help="create an Ed25519 key pair (NAME.key, NAME.pub); same as `weft keys new`")
    kg.add_argument("--kind", choices=("node", "coordinator"), help="node: also the Flower auth key pair")
    kg.add_argument("--out", required=True, help="folder for the key files")
    kg.add_argument("--name", required=True, help="file name stem, e.g. hospital-a")
    kg.set_defaults(func=_keygen)

    vm = sub.add_parser("verify-model", help="check a signed global model file offline")
    vm.add_argument("model", help="path to a .npz written by the coordinator")
    vm.add_argument("--coordinator-key", required=True, help="the coordinator's public key (.pub)")
    vm.set_defaults(func=_verify_model)

    ex = sub.add_parser(
        "export",
        help="write a finished run's signed global model as a Hugging Face model directory",
        description="Verifies RUN_DIR/global_model.npz against the coordinator key, rebuilds the task's model and "
        "writes it with save_pretrained (safetensors). LoRA runs are merged into the base unless --adapters-only.",
    )
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a `weft simulate --out` folder of a completed run")
    ex.add_argument("--out", required=True, help="new (or empty) folder for the model")
    ex.add_argument("--coordinator-key", help="the coordinator's public key (default: RUN_DIR/keys/coordinator.pub)")
    ex.add_argument("--adapters-only", action="store_true", help="LoRA runs: write the adapters, not the merged model")
    ex.set_defaults(func=_export)

    man = sub.add_parser(
        "manifest",
        help="create, extend or change a signed federation manifest",
        description="Every edit writes the next version, signed with the coordinator's private key, atomically.",
    )
    man_sub = man.add_subparsers(required=True, metavar="ACTION")
    signer = argparse.ArgumentParser(add_help=False)
    signer.add_argument("--coordinator-key-file", required=True, help="the coordinator's private key (.key)")
    mi = man_sub.add_parser("init", parents=[signer], help="start a manifest (version 1) for a federation")
    mi.add_argument("manifest", help="path of the manifest to create")
    mi.add_argument("--federation-id", required=True, help="e.g. eu-health-2026")
    mi.add_argument("--coordinator-key", help="the coordinator's public key (.pub); checked against the private key")
    mi.set_defaults(func=_manifest_init)
    ma = man_sub.add_parser("add", parents=[signer], help="admit a member (status active)")
    ma.add_argument("manifest", help="path of an existing manifest")
    ma.add_argument("--name", required=True, help="member name, e.g. hospital-a")
    ma.add_argument("--key", required=True, help="the member's public key (.pub)")
    ma.add_argument("--jurisdiction", required=True, help="where the member's data lives, e.g. DE")
    ma.add_argument("--max-examples", type=int, required=True, help="most examples it may claim per update")
    ma.add_argument(
        "--flower-auth-key", help="the node's Flower auth public key (NAME.flower.pub from `weft keys new`)"
    )
    ma.set_defaults(func=_manifest_add)
    for action, func, help_ in (
        ("suspend", _manifest_suspend, "suspend a member: its updates are rejected until it is reinstated"),
        ("reinstate", _manifest_reinstate, "make a suspended member active again"),
        ("revoke", _manifest_revoke, "revoke a member for good (it can never be reinstated)"),
    ):
        ms = man_sub.add_parser(action, parents=[signer], help=help_)
        ms.add_argument("manifest", help="path of an existing manifest")
        ms.add_argument("--member", required=True, help="the member's name or member id")
        ms.set_defaults(func=func)
    mshow = man_sub.add_parser("show", help="verify a manifest's signature and list its members")
    mshow.add_argument("manifest", help="path of a manifest")
    mshow.add_argument("--coordinator-key", help="the trusted coordinator public key (.pub) it must be signed by")
    mshow.set_defaults(func=_manifest_show)
    from federation.deploy import register as register_deploy  # torch- and flwr-free until a command runs

    register_deploy(sub)
    from federation.audit import register as register_audit  # needs neither flwr nor torch

    register_audit(sub)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
