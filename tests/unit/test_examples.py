"""The three task files docs/TASKS.md shows: embedded verbatim, and each one loads, reads its data and trains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from federation.config import resolve_run_config
from federation.tasks import TaskOptions, check_task, load_local, load_task
from federation.tasks.text import byte_tokenizer
from node import ExchangeSpec, LocalModel, TrainConfig, evaluate_local, train_local

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ("wine_task.py", "sensor_task.py", "lora_task.py")


@pytest.mark.parametrize("name", EXAMPLES)
def test_tasks_md_shows_each_example_file_verbatim(name: str) -> None:
    source = (ROOT / "examples" / name).read_text()
    assert f"```python\n{source}```" in (ROOT / "docs" / "TASKS.md").read_text()


def test_wine_task_prefers_its_own_optimizer_under_the_users_flags() -> None:
    task = load_task("examples.wine_task:task")
    run = resolve_run_config({"learning-rate": 0.02}, task.defaults, "flags")
    assert (run.optimizer, run.weight_decay, run.lr_schedule, run.learning_rate) == ("adamw", 0.01, "cosine", 0.02)
    data = check_task(task, seed=0)
    assert (len(data.pool), len(data.test)) == (134, 44)  # type: ignore[arg-type]


def test_sensor_task_reads_a_partners_jsonl_folder_and_learns(tmp_path: Path) -> None:
    task = load_task("examples.sensor_task:task")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    rows = [{"features": row.tolist(), "target": float(np.tanh(row @ np.linspace(-1, 1, 6)))} for row in x]
    (tmp_path / "readings.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    local = load_local(task, tmp_path)
    assert (len(local.train), len(local.val)) == (32, 8)  # type: ignore[arg-type]
    model = task.make_model()
    before = evaluate_local(model, local.val, torch.device("cpu"), recipe=task.recipe)
    config = TrainConfig(local_epochs=30, optimizer="adam", learning_rate=0.01, batch_size=8)
    train_local(model, local.train, config, torch.device("cpu"), seed=0, recipe=task.recipe)
    after = evaluate_local(model, local.val, torch.device("cpu"), recipe=task.recipe)
    assert set(after.metrics) == {"loss", "mae"}
    assert after.loss < 0.5 * before.loss
    sim = check_task(task, seed=0)
    assert sim.owners is not None and sorted(set(sim.owners)) == [f"site-{s}" for s in range(8)]


def test_lora_task_fine_tunes_only_adapters_of_a_local_checkpoint(tmp_path: Path) -> None:
    # a tiny causal-LM checkpoint folder, as a partner would hold one (no download)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    byte_tokenizer().save_pretrained(tmp_path / "ckpt")
    task = load_task("examples.lora_task:task", TaskOptions(model_dir=tmp_path / "ckpt"))
    assert (task.name, task.exchange) == ("lora-lm", "lora")

    local = LocalModel(task.make_model, ExchangeSpec("lora", lora_rank=4))
    full = sum(t.numel() * t.element_size() for t in task.make_model().state_dict().values())
    sent = sum(a.nbytes for a in local.arrays().values())
    assert sorted({n.split(".")[-3] for n in local.names}) == ["lora_A", "lora_B"]  # ...q_proj.lora_A.default.weight
    assert sent / full < 0.05
    assert local.frozen == LocalModel(task.make_model, ExchangeSpec("lora", lora_rank=4)).frozen  # same base

    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    split = load_local(task, data)
    before = evaluate_local(local.model, split.val, torch.device("cpu"), recipe=task.recipe)
    train_config = TrainConfig(local_epochs=3, optimizer="adamw", learning_rate=0.01, batch_size=4)
    train_local(local.model, split.train, train_config, torch.device("cpu"), seed=0, recipe=task.recipe)
    after = evaluate_local(local.model, split.val, torch.device("cpu"), recipe=task.recipe)
    assert after.metrics["perplexity"] < 0.9 * before.metrics["perplexity"]
    assert local.frozen == LocalModel(task.make_model, ExchangeSpec("lora", lora_rank=4)).frozen  # base untouched
