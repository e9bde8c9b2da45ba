"""`weft export`: a fake finished run (no Flower) exported to a Hugging Face model directory, and every refusal.

The run's task lives in this module (`tests.unit.test_export:tiny_task`), a deterministic tiny Llama,
and so does its tokenizer hook (`tokenizer_for`), a 256-symbol byte-level BPE without merges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from federation.cli import main
from federation.export import ADAPTERS, MERGED, MODEL, ExportRefused, export_run
from federation.tasks import Task, TaskOptions
from node import ExchangeSpec, LocalModel
from protocols import (
    GlobalModelEnvelope,
    SigningKey,
    params_digest,
    save_public_key,
    sign_global_model,
    write_signed_model,
)
from protocols.npz import load_npz, save_npz

TASK_REF = "tests.unit.test_export:tiny_task"
FEDERATION = "test-fed"
RUN_ID = "sim-0123456789ab"
ROUND = 3
LORA: dict[str, Any] = {"lora-rank": 4, "lora-alpha": 8.0, "lora-dropout": 0.0, "lora-targets": "q_proj,v_proj"}


def make_tiny_llama() -> nn.Module:
    """A deterministic 1-layer Llama over 256 byte tokens (hidden 16, 2 heads)."""
    torch.manual_seed(1234)
    return make_unseeded_llama()


def make_unseeded_llama() -> nn.Module:
    """The same Llama, initialised from torch's global generator (the run's seed decides its base)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def tokenizer_for(options: TaskOptions) -> Any:
    """The tokenizer hook weft export looks up next to `make_model`: byte-level, one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: byte for byte, symbol in _byte_symbols().items()}  # token id == byte value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _byte_symbols() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (the ByteLevel pre-tokenizer's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in symbols]
    symbols.update({b: chr(256 + i) for i, b in enumerate(others)})
    return symbols


tiny_task = Task(name="tiny-llama", make_model=make_tiny_llama)
unseeded_task = Task(name="tiny-llama", make_model=make_unseeded_llama)
plain_task = Task(name="plain", make_model=lambda: nn.Linear(4, 2))


@dataclass
class FakeRun:
    """A run directory as `weft simulate` leaves it, and what went into it."""

    path: Path
    key: SigningKey
    arrays: dict[str, np.ndarray]
    """The signed exchanged arrays."""
    local: LocalModel
    """The model the arrays were taken from (already holding them)."""

    @property
    def model(self) -> Any:
        """The Hugging Face (or peft) model inside `local`."""
        return self.local.model


def fake_run(
    root: Path,
    exchange: str = "all",
    task_ref: str = TASK_REF,
    make_model: Any = make_tiny_llama,
    summary_edits: dict[str, Any] | None = None,
    config_edits: dict[str, Any] | None = None,
    frozen: str | None = None,
    signer: SigningKey | None = None,
) -> FakeRun:
    """Write keys/, a signed global_model.npz and summary.json under `root / "run"` without running Flower."""
    run = root / "run"
    key = SigningKey.generate()
    save_public_key(key.public_key, run / "keys" / "coordinator.pub")
    config: dict[str, Any] = {"task": task_ref, "model-dir": "", "exchange": exchange, **LORA, "seed": 7, "rounds": 3}
    spec = ExchangeSpec.from_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"])  # as federation.simulation.initial_model
        local = LocalModel(make_model, spec)
    arrays = _trained(local.arrays())
    local.load(arrays)
    task_name = "plain" if task_ref.endswith("plain_task") else "tiny-llama"
    envelope = GlobalModelEnvelope(
        FEDERATION, RUN_ID, ROUND, params_digest(arrays), task_name,
        config={"learning-rate": 0.01, **spec.to_config(), "frozen-digest": frozen or local.frozen},
    )  # fmt: skip
    write_signed_model(run / "global_model.npz", arrays, sign_global_model(signer or key, envelope))
    summary = {
        "status": "completed",
        "federation_id": FEDERATION,
        "run_id": RUN_ID,
        "task": task_name,
        "rounds": ROUND,
        "config": {**config, **(config_edits or {})},
        "global_model_digest": params_digest(arrays).hex(),
        "global_model_file": "global_model.npz",
        "coordinator_public_key": key.public_key.hex(),
        **(summary_edits or {}),
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return FakeRun(run, key, arrays, local)


def _trained(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays moved away from their initial values (LoRA B starts at zero: a merge would change nothing)."""
    rng = np.random.default_rng(0)
    return {name: (a + rng.normal(0, 0.05, a.shape)).astype(a.dtype) for name, a in sorted(arrays.items())}


def _state(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: t.detach().numpy() for name, t in model.state_dict().items()}


def _lora_pairs(arrays: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """base-model weight name -> (A, B) of the adapter on it."""
    pairs = {}
    for name, a in arrays.items():
        if ".lora_A." in name:
            module = name.removeprefix("base_model.model.").split(".lora_A.")[0]
            pairs[f"{module}.weight"] = (a, arrays[name.replace(".lora_A.", ".lora_B.")])
    return pairs


# ---- exchange all ------------------------------------------------------------------------------------------


def test_export_all_writes_a_loadable_model_with_the_signed_weights(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = fake_run(tmp_path)
    out = tmp_path / "model"
    result = export_run(run.path, out)

    assert (result.exported, result.run_id, result.federation_id, result.round) == (MODEL, RUN_ID, FEDERATION, ROUND)
    assert result.model_digest == params_digest(run.arrays).hex()
    assert result.tokenizer is True
    loaded = AutoModelForCausalLM.from_pretrained(out)
    state = _state(loaded)
    assert sorted(state) == sorted(run.arrays)
    for name, array in run.arrays.items():
        np.testing.assert_array_equal(state[name], array, err_msg=name)
    prompt = torch.tensor([[1, 2, 3]])
    tokens = loaded.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert tokens.shape == (1, 8)
    run.model.eval()
    assert tokens.tolist() == run.model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False).tolist()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("weft ü")["input_ids"] == list("weft ü".encode())
    assert tokenizer.decode(tokenizer("weft ü")["input_ids"]) == "weft ü"


def test_export_record_says_where_the_model_came_from(tmp_path: Path) -> None:
    run = fake_run(tmp_path)
    out = tmp_path / "model"
    export_run(run.path, out)

    record = json.loads((out / "weft_export.json").read_text())
    assert record["exported"] == MODEL
    assert (record["federation_id"], record["run_id"], record["round"]) == (FEDERATION, RUN_ID, ROUND)
    assert (record["task"], record["task_reference"]) == ("tiny-llama", TASK_REF)
    assert record["model_digest"] == params_digest(run.arrays).hex()
    assert record["frozen_digest"] == run.local.frozen
    assert record["exchange"] == {"exchange": "all", **LORA}
    assert record["coordinator_public_key"] == run.key.public_key.hex()
    assert record["source"] == str(run.path.resolve())
    assert record["tokenizer"] is True
    assert {"config.json", "model.safetensors", "tokenizer.json", "weft_export.json"} <= set(record["files"])
    assert sorted(p.name for p in out.iterdir()) == record["files"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_export_into_an_existing_empty_folder(tmp_path: Path) -> None:
    run = fake_run(tmp_path)
    out = tmp_path / "model"
    out.mkdir()
    assert export_run(run.path, out).out == out
    assert (out / "model.safetensors").is_file()


# ---- exchange lora -------------------------------------------------------------------------------------------


def test_export_lora_merges_the_signed_adapters_into_the_base(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run = fake_run(tmp_path, exchange="lora")
    out = tmp_path / "merged"
    assert export_run(run.path, out).exported == MERGED

    merged = _state(AutoModelForCausalLM.from_pretrained(out))
    base = _state(make_tiny_llama())
    assert sorted(merged) == sorted(base)
    pairs = _lora_pairs(run.arrays)
    assert sorted(pairs) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    scale = LORA["lora-alpha"] / LORA["lora-rank"]
    for name, weight in base.items():
        if name in pairs:
            a, b = pairs[name]
            np.testing.assert_allclose(merged[name], weight + scale * (b @ a), rtol=0, atol=1e-6, err_msg=name)
            assert not np.allclose(merged[name], weight)
        else:
            np.testing.assert_array_equal(merged[name], weight, err_msg=name)


def test_export_lora_adapters_only_loads_with_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    run = fake_run(tmp_path, exchange="lora")
    out = tmp_path / "adapters"
    assert export_run(run.path, out, adapters_only=True).exported == ADAPTERS

    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8.0)
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]
    model = PeftModel.from_pretrained(make_tiny_llama(), out)
    state = _state(model)
    assert sorted(n for n in state if "lora_" in n) == sorted(run.arrays)
    for name, array in run.arrays.items():
        np.testing.assert_array_equal(state[name], array, err_msg=name)


def test_export_lora_rebuilds_a_random_base_from_the_run_seed(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run = fake_run(tmp_path, exchange="lora", task_ref="tests.unit.test_export:unseeded_task",
                   make_model=make_unseeded_llama)  # fmt: skip
    out = tmp_path / "merged"
    export_run(run.path, out)
    merged = _state(AutoModelForCausalLM.from_pretrained(out))
    expected = _state(run.model.merge_and_unload())
    assert sorted(merged) == sorted(expected)
    for name, weight in expected.items():
        np.testing.assert_array_equal(merged[name], weight, err_msg=name)


def test_refuses_a_random_base_rebuilt_from_another_seed(tmp_path: Path) -> None:
    run = fake_run(tmp_path, exchange="lora", task_ref="tests.unit.test_export:unseeded_task",
                   make_model=make_unseeded_llama, config_edits={"seed": 8})  # fmt: skip
    _refused(run.path, tmp_path / "out", r"rebuilds a frozen base with digest .*: a different base")


def test_adapters_only_is_refused_for_a_full_model_run(tmp_path: Path) -> None:
    run = fake_run(tmp_path)
    with pytest.raises(ExportRefused, match=r"--adapters-only: run exchanged 'all' weights, not LoRA adapters"):
        export_run(run.path, tmp_path / "out", adapters_only=True)
    assert not (tmp_path / "out").exists()


# ---- refusals -------------------------------------------------------------------------------------------------


def _flip_a_byte(model_file: Path) -> None:
    """Change one byte of one parameter array, keeping the original envelope and signature."""
    entries = load_npz(model_file)
    name = sorted(n for n in entries if not n.startswith("__weft__."))[0]
    raw = entries[name].view(np.uint8)
    raw.flat[5] ^= 0x01
    save_npz(model_file, entries)


def _refused(run_dir: Path, out: Path, match: str, **kwargs: Any) -> None:
    with pytest.raises(ExportRefused, match=match):
        export_run(run_dir, out, **kwargs)
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_refuses_a_tampered_model(tmp_path: Path) -> None:
    run = fake_run(tmp_path)
    _flip_a_byte(run.path / "global_model.npz")
    _refused(run.path, tmp_path / "out", r"is not a model signed by the coordinator: .*arrays do not match the signed")


def test_refuses_a_model_signed_by_another_key(tmp_path: Path) -> None:
    run = fake_run(tmp_path, signer=SigningKey.generate())
    _refused(run.path, tmp_path / "out", r"is not a model signed by the coordinator: signature does not verify")


def test_refuses_a_coordinator_key_the_run_does_not_name(tmp_path: Path) -> None:
    run = fake_run(tmp_path)
    other = SigningKey.generate()
    save_public_key(other.public_key, tmp_path / "other.pub")
    match = rf"coordinator key .*other\.pub \(member {other.member_id}\) is not the key that ran this federation"
    _refused(run.path, tmp_path / "out", match, coordinator_key=tmp_path / "other.pub")


def test_refuses_a_summary_whose_task_differs(tmp_path: Path) -> None:
    run = fake_run(tmp_path, summary_edits={"task": "other-task"})
    match = r"summary.json says task 'other-task' but the signed global model says 'tiny-llama'"
    _refused(run.path, tmp_path / "out", match)


def test_refuses_a_summary_whose_exchange_settings_differ(tmp_path: Path) -> None:
    run = fake_run(tmp_path, exchange="lora", config_edits={"lora-alpha": 32.0})
    _refused(
        run.path, tmp_path / "out", r"summary.json's exchange settings .*'lora-alpha': 32.0.* differ from the signed"
    )


def test_refuses_a_different_frozen_base(tmp_path: Path) -> None:
    run = fake_run(tmp_path, exchange="lora", frozen="ab" * 32)
    _refused(
        run.path,
        tmp_path / "out",
        r"rebuilds a frozen base with digest .* but the run signed abababab.*a different base",
    )


def test_refuses_a_run_that_did_not_complete(tmp_path: Path) -> None:
    run = fake_run(tmp_path, summary_edits={"status": "failed"})
    _refused(run.path, tmp_path / "out", r"the run did not complete \(status 'failed'\)")


def test_refuses_a_run_without_a_global_model(tmp_path: Path) -> None:
    run = fake_run(tmp_path)
    (run.path / "global_model.npz").unlink()
    _refused(run.path, tmp_path / "out", r"global_model.npz not found: the run left no signed global model")


def test_refuses_a_task_whose_model_is_not_a_hugging_face_model(tmp_path: Path) -> None:
    run = fake_run(tmp_path, task_ref="tests.unit.test_export:plain_task", make_model=plain_task.make_model)
    _refused(
        run.path, tmp_path / "out", r"task 'plain': its model is a plain Linear, not a Hugging Face PreTrainedModel"
    )


def test_refuses_to_overwrite_a_non_empty_folder(tmp_path: Path) -> None:
    run = fake_run(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportRefused, match=r"--out .*out exists and is not an empty folder; refusing to overwrite it"):
        export_run(run.path, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


# ---- command line ---------------------------------------------------------------------------------------------


def test_cli_export_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run(tmp_path, exchange="lora")
    out = tmp_path / "adapters"
    key = run.path / "keys" / "coordinator.pub"
    assert main(["export", str(run.path), "--out", str(out), "--coordinator-key", str(key), "--adapters-only"]) == 0

    captured = capsys.readouterr()
    assert captured.err == ""  # no progress bars or library notices
    lines = captured.out.splitlines()
    digest = params_digest(run.arrays).hex()[:16]
    assert lines == [
        f"exported adapters of run {RUN_ID} (federation {FEDERATION}, round {ROUND}, digest {digest}) "
        f"with its tokenizer -> {out}"
    ]
    assert (out / "adapter_model.safetensors").is_file()


def test_cli_export_of_a_tampered_model_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = fake_run(tmp_path)
    _flip_a_byte(run.path / "global_model.npz")
    assert main(["export", str(run.path), "--out", str(tmp_path / "out")]) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"weft: error: {run.path / 'global_model.npz'} is not a model signed by the coordinator")
    assert lines[0].endswith("arrays do not match the signed model digest")
    assert not (tmp_path / "out").exists()
