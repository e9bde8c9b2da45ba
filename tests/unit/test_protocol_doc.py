"""docs/PROTOCOL.md against the code: the evaluation and ledger vectors, section references, record tables.

The `hex vector=NAME` and `jsonl vector=NAME` blocks of section 11 (E1, L0) are recomputed here from the
inputs of section 11.1 and must match byte for byte (tests/unit/test_protocols.py checks the other blocks).
Every "section N" / "section N.M" reference must name a heading of the document, and the tables of the
ledger's record kinds (section 14.4) must list exactly the fields the coordinator writes.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocols import SigningKey, params_digest, wire
from protocols.aggregation import FedAvg
from protocols.envelope import EvaluationEnvelope, Kind, sign_evaluation
from protocols.identity import Domain
from protocols.ledger import GENESIS, KINDS, MAX_LINE_BYTES, LedgerWriter, canonical, read_ledger, verify_chain
from protocols.reasons import RejectReason
from protocols.server_opt import OuterNesterov

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "PROTOCOL.md"

# ---- the inputs of section 11.1 ---------------------------------------------------------------------

NODE = SigningKey.from_seed(bytes(range(32)))
COORDINATOR = SigningKey.from_seed(bytes(range(32, 64)))

L0_POLICY = {"weighting": "examples", "quality_floor": None, "maximize": True, "max_share": None, "norm_bound": None}


def p1() -> dict[str, np.ndarray]:
    return {
        "layer.weight": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32),
        "layer.bias": np.array([0.5, -1.0], dtype=np.float32),
    }


def e1() -> EvaluationEnvelope:
    return EvaluationEnvelope(
        federation_id="fed-demo",
        run_id="run-0001",
        round=2,
        sender=NODE.member_id,
        model_digest=params_digest(p1()),
        num_examples=250,
        metrics={"eval_loss": 0.5, "eval_accuracy": 0.75},
    )


def l0_fields() -> dict[str, object]:
    return {
        "task": "digits",
        "coordinator_key": COORDINATOR.public_key.hex(),
        "initial_digest": params_digest(p1()).hex(),
        "initial_model": "global/round-0000.npz",
        "rounds": 3,
        "rule": FedAvg().describe(),
        "policy": L0_POLICY,
        "server_optimizer": OuterNesterov(0.7, 0.9).describe(),
        "store_updates": True,
        "config": {"seed": 7},
    }


def l0_file(tmp: Path) -> bytes:
    """The ledger file after the coordinator key wrote L0 (one line and its newline)."""
    path = tmp / "ledger.jsonl"
    LedgerWriter(path, COORDINATOR, "fed-demo", "run-0001").append("start", l0_fields())
    return path.read_bytes()


# ---- reading the document -----------------------------------------------------------------------------


def parse_blocks(markdown: str) -> dict[str, str]:
    """`hex vector=NAME` blocks (whitespace deleted) and `jsonl vector=NAME` blocks (exact text), by name."""
    out: dict[str, str] = {}
    for kind, name, body in re.findall(r"^```(hex|jsonl) vector=(\S+)\n(.*?)^```$", markdown, flags=re.M | re.S):
        assert name not in out, f"vector {name!r} appears twice"
        if kind == "hex":
            body = "".join(body.split())
            assert re.fullmatch(r"[0-9a-f]+", body), f"vector {name!r} is not lowercase hex"
        out[name] = body
    return out


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def blocks(doc: str) -> dict[str, str]:
    return parse_blocks(doc)


def test_block_parser() -> None:
    text = '```hex vector=a\n  00ff\n  10\n```\n```jsonl vector=b\n{"x":1}\n```\n```vector\nname: c\n```\n'
    assert parse_blocks(text) == {"a": "00ff10", "b": '{"x":1}\n'}


def test_document_holds_exactly_these_blocks(blocks: dict[str, str]) -> None:
    assert sorted(blocks) == [
        "evaluation-envelope-1",
        "evaluation-envelope-1-signature",
        "ledger-start-0",
        "ledger-start-0-sha256",
    ]


# ---- E1 -------------------------------------------------------------------------------------------------


def test_evaluation_envelope_vector(blocks: dict[str, str]) -> None:
    assert blocks["evaluation-envelope-1"] == e1().encode().hex()


def test_evaluation_signature_vector(blocks: dict[str, str]) -> None:
    signed = sign_evaluation(NODE, e1())
    assert blocks["evaluation-envelope-1-signature"] == signed.signature.hex()
    # plain Ed25519 over b"weft/evaluation/v1\x00" || envelope bytes
    body = bytes.fromhex(blocks["evaluation-envelope-1"])
    Ed25519PublicKey.from_public_bytes(NODE.public_key.raw).verify(
        bytes.fromhex(blocks["evaluation-envelope-1-signature"]), b"weft/evaluation/v1\x00" + body
    )


def test_evaluation_vector_decodes_to_e1_and_has_the_documented_layout(blocks: dict[str, str]) -> None:
    data = bytes.fromhex(blocks["evaluation-envelope-1"])
    assert EvaluationEnvelope.decode(data) == e1()
    assert data[:6] == b"WEFT\x01\x03" and Kind.EVALUATION == 3
    digest = params_digest(p1())
    assert data[0x36:0x56] == digest
    assert data[0x56:0x5E] == (250).to_bytes(8, "big")
    assert len(data) == 144


# ---- L0 -------------------------------------------------------------------------------------------------


def test_ledger_line_vector(blocks: dict[str, str], tmp_path: Path) -> None:
    assert blocks["ledger-start-0"].encode("utf-8") == l0_file(tmp_path)


def test_ledger_line_hash_vector(blocks: dict[str, str]) -> None:
    line = blocks["ledger-start-0"].encode("utf-8").removesuffix(b"\n")
    assert blocks["ledger-start-0-sha256"] == hashlib.sha256(line).hexdigest()


def test_ledger_line_is_signed_over_the_canonical_body_as_documented(blocks: dict[str, str], tmp_path: Path) -> None:
    line = blocks["ledger-start-0"].encode("utf-8").removesuffix(b"\n")
    assert len(line) == 784
    doc = json.loads(line)
    body = doc["body"]
    assert body["seq"] == 0 and body["prev"] == GENESIS and body["kind"] == "start" and body["ledger"] == 1
    assert line == canonical(doc)
    # the signed bytes are the line between {"body": and ,"signature":
    inner = line[len(b'{"body":') : line.index(b',"signature":"')]
    assert inner == canonical(body) and len(inner) == 632
    Ed25519PublicKey.from_public_bytes(COORDINATOR.public_key.raw).verify(
        bytes.fromhex(doc["signature"]), b"weft/ledger/v1\x00" + inner
    )
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(blocks["ledger-start-0"].encode("utf-8"))
    read = read_ledger(path)
    assert not read.torn_tail and verify_chain(read.entries, COORDINATOR.public_key) == []
    assert read.entries[0].digest == blocks["ledger-start-0-sha256"]


def test_l0_policy_is_the_default_policy_description() -> None:
    """Section 11.1 writes the policy description out by hand: it must be what the code records."""
    policy = pytest.importorskip("protocols.policy")
    assert policy.ContributionPolicy().describe() == L0_POLICY


# ---- section references ------------------------------------------------------------------------------

_HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", re.M)
_NUMBER = r"\d+(?:\.\d+)*"
_REFERENCE = re.compile(rf"\b[Ss]ections? ({_NUMBER}(?:(?:,| and| to| or) {_NUMBER})*)")


def headings(markdown: str) -> list[str]:
    return _HEADING.findall(markdown)


def references(markdown: str) -> list[tuple[str, str]]:
    """(number, context) of every internal "section N(.M)" reference; RFC sections are external."""
    out = []
    for match in _REFERENCE.finditer(markdown):
        before = markdown[max(0, match.start() - 20) : match.start()]
        if "RFC" in before:
            continue
        for number in re.findall(_NUMBER, match.group(1)):
            out.append((number, markdown[max(0, match.start() - 60) : match.end() + 20].replace("\n", " ")))
    return out


def test_reference_parser() -> None:
    text = "## 1. A\n### 1.1 B\nsee section 1.1, sections 1 to 2 and (RFC 8032, section 5.1.3).\n"
    assert headings(text) == ["1", "1.1"]
    assert [n for n, _ in references(text)] == ["1.1", "1", "2"]


def test_every_section_reference_names_a_heading(doc: str) -> None:
    known = set(headings(doc))
    refs = references(doc)
    assert len(refs) > 40
    assert [(n, where) for n, where in refs if n not in known] == []


def test_sections_are_numbered_in_sequence(doc: str) -> None:
    numbers = headings(doc)
    top = [int(n) for n in numbers if "." not in n]
    assert top == list(range(1, len(top) + 1))
    expected_sub: dict[int, int] = {}
    for n in numbers:
        if "." in n:
            major, minor = (int(x) for x in n.split("."))
            assert minor == expected_sub.get(major, 0) + 1, f"section {n} out of sequence"
            expected_sub[major] = minor
    # the contents line lists every top-level section in order
    contents = re.search(r"^Contents: (.*?)\n\n", doc, flags=re.M | re.S)
    assert contents is not None
    listed = [int(x) for x in re.findall(r"(?:^|· )(\d+) ", contents.group(1).replace("\n", " "))]
    assert listed == top


def test_code_references_to_the_document_still_hold(doc: str) -> None:
    """Other files cite sections of the document by number; they must still be about the same thing."""
    titles = dict(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? (.*)$", doc, flags=re.M))
    assert titles["3.1"] == "Keys and member ids"  # protocols/identity.py: weak keys
    assert titles["5"] == "Flower message layout"  # docs/ARCHITECTURE.md
    assert titles["7"] == "Federation manifest"  # protocols/manifest.py error messages
    assert titles["11"] == "Test vectors" and titles["11.1"] == "Inputs"  # tests/unit/test_protocols.py


# ---- constants and names the document states ---------------------------------------------------------


def test_domains_are_documented_with_their_hex(doc: str) -> None:
    for domain in Domain:
        assert f"| `{domain.name}`" in doc
        assert f"`{domain.value.hex()}`" in doc


def test_new_names_and_limits_are_documented(doc: str) -> None:
    assert f"`{wire.EVALUATION_RECORD}`" in doc and "`EVALUATION_RECORD`" in doc
    assert "`__weft__.envelope`" in doc and "`__weft__.signature`" in doc
    assert MAX_LINE_BYTES == 67_108_864 and "67 108 864" in doc
    for kind in KINDS:
        assert f"**`{kind}`**" in doc


def test_reason_table_follows_the_code_order(doc: str) -> None:
    section = doc[doc.index("### 6.2") : doc.index("### 6.3")]
    rows = re.findall(r"^\| \d+ +\| `([a-z_]+)` *\|", section, flags=re.M)
    first_seen = list(dict.fromkeys(rows))
    assert first_seen == [str(r) for r in RejectReason]


def test_evaluation_checks_match_the_coordinator(doc: str) -> None:
    """The rules coordinator/evaluation.py and protocols/audit.py both apply (protocols/evaluation.py)."""
    from protocols.evaluation import MAX_ABS_METRIC, METRIC_NAME

    section = doc[doc.index("### 6.3") : doc.index("## 7.")]
    assert f"`{METRIC_NAME.pattern}`" in section
    assert MAX_ABS_METRIC == 1e9 and "≤ 10⁹" in section


# ---- the record kinds of section 14.4 list exactly the fields the coordinator writes --------------------


def _table_fields(doc: str, kind: str) -> set[str]:
    """The first-column names of the table after the `**`kind`**` paragraph of section 14.4."""
    section = doc[doc.index("### 14.4") : doc.index("## 15.")]
    after = section[section.index(f"**`{kind}`**") :]
    table = re.search(r"^\| Field .*?\n((?:\|.*\n)+)", after, flags=re.M)
    assert table is not None
    names: set[str] = set()
    for row in table.group(1).splitlines()[1:]:
        first = row.split("|")[1]
        names.update(re.findall(r"`([a-z_]+)`", first))
    return names


def _contribution_fields(doc: str) -> set[str]:
    section = doc[doc.index("Each element of `contributions`") : doc.index("**`failure`**")]
    table = re.search(r"^\| Field .*?\n((?:\|.*\n)+)", section, flags=re.M)
    assert table is not None
    return {re.findall(r"`([a-z_]+)`", row.split("|")[1])[0] for row in table.group(1).splitlines()[1:]}


def _dict_keys(node: ast.AST) -> set[str]:
    return {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}  # type: ignore[attr-defined]


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"no function {name}")


def _returned_dict(fn: ast.FunctionDef) -> set[str]:
    for node in ast.walk(fn):
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Dict):
            return _dict_keys(node.value)
    raise AssertionError(f"{fn.name} returns no dict literal")


def _appended(fn: ast.FunctionDef, kind: str) -> set[str]:
    """Keys of the dict literal passed to `self.ledger.append(kind, {...})` in `fn`."""
    for node in ast.walk(fn):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "append"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == kind
        ):
            return _dict_keys(node.args[1])
    raise AssertionError(f"{fn.name} appends no {kind} record")


def _end_calls(tree: ast.Module) -> set[str]:
    keys: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "end"
            and len(node.args) == 2
            and isinstance(node.args[1], ast.Dict)
        ):
            keys |= _dict_keys(node.args[1])
    return keys


@pytest.fixture(scope="module")
def sources() -> tuple[ast.Module, ast.Module]:
    rounds = ast.parse((ROOT / "coordinator" / "rounds.py").read_text(encoding="utf-8"))
    record = ast.parse((ROOT / "coordinator" / "record.py").read_text(encoding="utf-8"))
    return rounds, record


def test_start_record_table(doc: str, sources: tuple[ast.Module, ast.Module]) -> None:
    rounds, record = sources
    written = _returned_dict(_function(rounds, "_start_fields")) | _appended(_function(record, "begin"), "start")
    assert _table_fields(doc, "start") == written


def test_round_record_table(doc: str, sources: tuple[ast.Module, ast.Module]) -> None:
    rounds, record = sources
    fn = _function(rounds, "_round_fields")
    written = _returned_dict(fn) | _appended(_function(record, "commit_round"), "round")
    assert _table_fields(doc, "round") == written
    contribution = next(
        _dict_keys(n.args[0])
        for n in ast.walk(fn)
        if isinstance(n, ast.Call)
        and getattr(n.func, "attr", "") == "append"
        and n.args
        and isinstance(n.args[0], ast.Dict)
    )
    assert _contribution_fields(doc) == contribution


def test_evaluation_record_table(doc: str, sources: tuple[ast.Module, ast.Module]) -> None:
    rounds, _ = sources
    run_round = _function(rounds, "run_round")
    ended = next(
        node.value
        for node in ast.walk(run_round)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "ended" for t in node.targets)
        and isinstance(node.value, ast.Dict)
    )
    assert _table_fields(doc, "evaluation") == _dict_keys(ended)


def test_failure_resume_end_tables(doc: str, sources: tuple[ast.Module, ast.Module]) -> None:
    rounds, record = sources
    assert _table_fields(doc, "failure") == _appended(_function(record, "fail_round"), "failure")
    assert _table_fields(doc, "resume") == _appended(_function(record, "note_resume"), "resume")
    assert _table_fields(doc, "end") == {"status"} | _end_calls(rounds)
