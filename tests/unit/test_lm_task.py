"""federation/tasks/text.py and federation/tasks/lm.py: the built-in causal language-model task `lm`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from federation.config import resolve_run_config
from federation.tasks import SimulationData, Task, TaskError, TaskOptions, lm, load_local, load_task
from federation.tasks.text import (
    TokenBlocks,
    _decode_prefix,
    byte_tokenizer,
    bytes_to_unicode,
    encode,
    is_byte_level,
    read_text_folder,
    separator_ids,
    stdlib_corpus,
    stdlib_files,
    token_blocks,
)
from node import ExchangeSpec, LocalModel, TrainConfig, evaluate_local, train_local

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return byte_tokenizer()


# ---- tokenizer ---------------------------------------------------------------------------------------


def test_bytes_to_unicode_is_gpt2_mapping() -> None:
    mapping = bytes_to_unicode()
    assert len(mapping) == 256
    assert len(set(mapping.values())) == 256
    assert mapping[ord("A")] == "A"
    assert mapping[ord(" ")] == "Ġ"  # GPT-2's well-known space marker, U+0120
    assert mapping[ord("\n")] == "Ċ"
    assert mapping[0] == chr(256)
    assert not any(ch.isspace() for ch in mapping.values())


def test_byte_tokenizer_ids_are_bytes_and_round_trip(tokenizer: Any) -> None:
    text = "def f(x):\n\treturn x  # Grüße, 東京 🙂\r\n\x00\x7f"
    ids = encode(tokenizer, text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 256
    assert is_byte_level(tokenizer)
    assert separator_ids(tokenizer) == [10, 10]  # no end-of-sequence token: a blank line


def test_byte_tokenizer_saves_and_loads(tokenizer: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "  leading spaces, ünïcödé and\ttabs  "
    assert encode(loaded, text) == list(text.encode("utf-8"))
    assert loaded.decode(encode(loaded, text)) == text


# ---- corpora -----------------------------------------------------------------------------------------


def test_stdlib_files_skip_tests_and_installed_packages() -> None:
    files = stdlib_files()
    owners = {owner for owner, _ in files}
    assert {"email", "json", "asyncio", "http", "argparse"} <= owners
    assert not owners & {"test", "idlelib", "lib2to3", "site-packages"}
    assert not any({"test", "tests", "site-packages", "dist-packages"} & set(path.parts) for _, path in files)
    assert [path for _, path in files] == sorted((path for _, path in files), key=lambda p: p.parts)


def test_stdlib_corpus_is_grouped_capped_and_deterministic() -> None:
    corpus = stdlib_corpus(5000, ["json", "email", "argparse"])
    assert list(corpus) == ["argparse", "email", "json"]
    assert corpus == stdlib_corpus(5000, ["argparse", "json", "email"])
    json_init = next(path for owner, path in stdlib_files() if owner == "json").read_text(encoding="utf-8")
    assert json_init.startswith(corpus["json"][:200])  # json/__init__.py comes first
    for text in corpus.values():
        assert 4996 <= len(text.encode("utf-8")) <= 5000


def test_stdlib_corpus_unknown_owner() -> None:
    with pytest.raises(TaskError, match=r"has no module or package \['no_such_pkg'\]"):
        stdlib_corpus(100, ["json", "no_such_pkg"])


def test_decode_prefix_never_splits_a_character() -> None:
    data = "aé€".encode()  # 1 + 2 + 3 bytes
    assert [_decode_prefix(data, n) for n in range(1, 7)] == ["a", "a", "aé", "aé", "aé", "aé€"]
    with pytest.raises(UnicodeDecodeError):
        _decode_prefix(b"\xff" + data, 4)


def test_read_text_folder_reads_txt_and_jsonl_in_order(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    lines = [json.dumps({"text": "third", "id": 1}), "", json.dumps({"text": "fourth"})]
    (tmp_path / "sub" / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert read_text_folder(tmp_path) == ["first", "second", "third", "fourth"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.jsonl", b'{"text": "ok"}\n{"text": \n', "d.jsonl, line 2: not valid JSON (Expecting value)"),
        ("d.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', 'd.jsonl, line 2: expected a JSON object with a "text" string'),
        ("d.jsonl", b'["text"]\n', 'd.jsonl, line 1: expected a JSON object with a "text" string'),
        ("d.txt", b"ok \xff\xfe", "d.txt: not UTF-8 text (bad byte at offset 3)"),
    ],
)
def test_read_text_folder_errors_name_file_and_line(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TaskError) as exc_info:
        read_text_folder(tmp_path)
    assert str(exc_info.value) == message


def test_read_text_folder_without_text(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"holds no \*\.txt or \*\.jsonl file"):
        read_text_folder(tmp_path)
    (tmp_path / "a.txt").write_text("", encoding="utf-8")
    with pytest.raises(TaskError, match="hold no text"):
        read_text_folder(tmp_path)


# ---- blocks ------------------------------------------------------------------------------------------


def test_token_blocks_join_documents_and_drop_the_tail(tokenizer: Any) -> None:
    ids = token_blocks(["ab", "cd", "e"], tokenizer, 3)  # a b \n \n c d \n \n e -> 9 ids
    assert ids.dtype == np.int64
    assert ids.tolist() == [[97, 98, 10], [10, 99, 100], [10, 10, 101]]
    assert token_blocks(["abcd"], tokenizer, 3).tolist() == [[97, 98, 99]]
    blocks = TokenBlocks(ids)
    assert len(blocks) == 3
    assert blocks.block == 3
    assert blocks[1].dtype == torch.int64
    assert blocks[1].tolist() == [10, 99, 100]


def test_held_out_split_samples_every_owner_and_keeps_one_in_the_pool() -> None:
    owners = np.asarray(["a"] * 5 + ["b"] * 2 + ["c"] * 1, dtype=object)
    pool, test = lm.held_out_split(owners, per_owner=2, seed=0)
    assert sorted([*pool, *test]) == list(range(8))
    assert [int((owners[test] == o).sum()) for o in "abc"] == [2, 1, 0]
    assert [int((owners[pool] == o).sum()) for o in "abc"] == [3, 1, 1]
    assert np.array_equal(test, lm.held_out_split(owners, 2, 0)[1])


# ---- the built-in task -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task() -> Task:
    return load_task("lm")


@pytest.fixture(scope="module")
def sim(task: Task) -> SimulationData:
    return task.simulation(0)


def test_load_task_lm(task: Task) -> None:
    assert task.name == "lm"
    assert task.exchange == "all"
    assert task.recipe.target == "loss"
    assert task.recipe.maximize is False
    assert task.recipe.metric_names() == {"loss", "perplexity", "bits_per_byte"}
    run = resolve_run_config({}, task.defaults, "test")
    assert (run.optimizer, run.batch_size, run.max_steps, run.rounds) == ("adamw", 8, 60, 10)


def test_builtin_model_is_deterministic_and_leaves_the_rng_alone(task: Task) -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = task.make_model()
    assert torch.equal(torch.rand(3), expected)
    second = task.make_model()
    a, b = first.state_dict(), second.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.dtype == torch.float32 for t in a.values())
    assert sum(p.numel() for p in first.parameters()) == 461_440


def test_lora_exchanges_a_small_fraction(task: Task) -> None:
    full = LocalModel(task.make_model, ExchangeSpec("all"))
    lora = LocalModel(task.make_model, ExchangeSpec("lora"))
    full_bytes = sum(a.nbytes for a in full.arrays().values())
    lora_arrays = lora.arrays()
    assert full_bytes == 461_440 * 4
    assert len(lora_arrays) == 8  # A and B of q_proj and v_proj in 2 layers
    assert all("lora_" in name and ("q_proj" in name or "v_proj" in name) for name in lora_arrays)
    assert sum(a.nbytes for a in lora_arrays.values()) == 8192 * 4  # 1.8% of the full model
    assert LocalModel(task.make_model, ExchangeSpec("lora")).frozen == lora.frozen


def test_forward_predicts_each_next_token(task: Task) -> None:
    batch = torch.arange(2 * 6).reshape(2, 6)
    outputs, targets = lm.lm_forward(task.make_model(), batch, CPU)
    assert outputs.shape == (10, 256)
    assert targets.tolist() == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]


def test_simulation_data_is_natural_with_a_held_out_test(sim: SimulationData) -> None:
    assert sim.owners is not None
    assert set(sim.owners) == set(lm.SIM_OWNERS)
    assert len(sim.test) == lm.TEST_BLOCKS_PER_OWNER * len(lm.SIM_OWNERS)  # type: ignore[arg-type]
    assert sim.pool[0].shape == (lm.BLOCK,)
    assert "256 held-out blocks of 128 tokens" in sim.description
    pool_rows = {tuple(row.tolist()) for row in sim.pool.ids}  # type: ignore[attr-defined]
    assert not any(tuple(row.tolist()) in pool_rows for row in sim.test.ids)  # type: ignore[attr-defined]


def test_a_few_steps_lower_the_loss(task: Task, tokenizer: Any) -> None:
    data = TokenBlocks(token_blocks(["the quick brown fox jumps over the lazy dog. " * 60], tokenizer, 64))
    model = task.make_model()
    before = evaluate_local(model, data, CPU, recipe=task.recipe)
    config = TrainConfig(optimizer="adamw", learning_rate=3e-3, batch_size=8, max_steps=8, seed=0)
    stats = train_local(model, data, config, CPU, seed=0, recipe=task.recipe)
    after = evaluate_local(model, data, CPU, recipe=task.recipe)
    assert stats.num_examples == len(data) == 42
    assert before.metrics["bits_per_byte"] == pytest.approx(before.loss / math.log(2))
    assert before.loss > 5.0
    assert after.loss < before.loss - 1.5


def test_local_data_splits_a_text_folder(task: Task, tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text("x" * (128 * 20 + 5), encoding="utf-8")
    data = load_local(task, tmp_path)
    assert (len(data.train), len(data.val)) == (18, 2)  # type: ignore[arg-type]
    assert data.train[0].tolist() == [ord("x")] * 128


# ---- checkpoint mode ---------------------------------------------------------------------------------


def _tiny_checkpoint(path: Path, tokenizer: Any) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=32, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(3)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_checkpoint_mode_loads_model_and_tokenizer(tokenizer: Any, tmp_path: Path) -> None:
    saved = _tiny_checkpoint(tmp_path / "ckpt", tokenizer)
    task = load_task("lm", TaskOptions(model_dir=tmp_path / "ckpt"))
    model = task.make_model()
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == torch.float32 for k, v in saved.state_dict().items())
    assert task.recipe.metric_names() == {"loss", "perplexity", "bits_per_byte"}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("y" * (32 * 10), encoding="utf-8")
    data = load_local(task, tmp_path / "data")
    assert data.train[0].shape == (32,)  # blocks shrink to the checkpoint's context
    assert (len(data.train), len(data.val)) == (9, 1)  # type: ignore[arg-type]
    stats = evaluate_local(model, data.train, CPU, recipe=task.recipe)
    assert stats.num_examples == 9 * 31


def test_checkpoint_with_an_eos_tokenizer_has_no_bits_per_byte(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<eos>"})
    _tiny_checkpoint(tmp_path, tokenizer)
    task = load_task("lm", TaskOptions(model_dir=tmp_path))
    assert task.recipe.metric_names() == {"loss", "perplexity"}
    loaded = lm.checkpoint_tokenizer(tmp_path)
    assert separator_ids(loaded) == [256]
    assert token_blocks(["ab", "c"], loaded, 4).tolist() == [[97, 98, 256, 99]]


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="is not a folder"):
        load_task("lm", TaskOptions(model_dir=tmp_path / "missing"))
    with pytest.raises(TaskError, match=r"is not a Hugging Face checkpoint \(it has no config.json\)"):
        load_task("lm", TaskOptions(model_dir=tmp_path))
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TaskError, match=r"cannot read its config\.json"):
        load_task("lm", TaskOptions(model_dir=tmp_path))


@pytest.mark.parametrize(("name", "cls"), [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_round_warmup_optimizer_ramps_the_configured_optimizer(name: str, cls: type) -> None:
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = lm.round_warmup_optimizer([weight], TrainConfig(optimizer=name, learning_rate=0.5))
    assert type(optimizer) is cls
    rates = []
    for _ in range(lm.ROUND_WARMUP_STEPS + 2):
        weight.grad = torch.ones(2)
        optimizer.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[:3] == pytest.approx([0.05, 0.1, 0.15])
    assert rates[lm.ROUND_WARMUP_STEPS - 1 :] == [0.5, 0.5, 0.5]
