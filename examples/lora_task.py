"""An example language-model task: LoRA fine-tuning of a causal-LM checkpoint a partner already holds.

Every partner (and the coordinator) has the same checkpoint folder on disk: `config.json`, safetensors weights and
its tokenizer files. Only the LoRA adapters travel (`exchange="lora"`). The digest of the frozen base is signed into
every global model, so a node holding a different base refuses to train. A partner's corpus is a folder of `.txt`
files in its node's `data-dir`. For researchers, `simulation_data` uses a few packages of the Python standard library.

    weft simulate --task examples.lora_task:task --model-dir /models/my-checkpoint --nodes 3 --partition natural
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from federation.tasks import LocalData, SimulationData, Task, TaskOptions, task_factory
from federation.tasks.text import TokenBlocks, stdlib_corpus, token_blocks
from node import Recipe, perplexity

BLOCK = 64


def forward(model: nn.Module, batch: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token prediction: one row of logits per predicted token."""
    ids = batch.to(device)
    logits = model(input_ids=ids[:, :-1]).logits
    return logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)


@task_factory
def task(options: TaskOptions) -> Task:
    """The task for the checkpoint in `--model-dir` (the node config's `model-dir` in deployment)."""
    if options.model_dir is None:
        raise ValueError("this task fine-tunes a checkpoint: pass --model-dir (or model-dir in the node config)")
    model_dir = Path(options.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    def make_model() -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)

    def local_data(data_dir: Path) -> LocalData:
        texts = [p.read_text(encoding="utf-8") for p in sorted(data_dir.glob("*.txt"))]
        ids = token_blocks(texts, tokenizer, BLOCK)
        cut = max(1, len(ids) // 10)  # the first 10% of blocks validate
        return LocalData(train=TokenBlocks(ids[cut:]), val=TokenBlocks(ids[:cut]))

    def simulation_data(seed: int) -> SimulationData:
        corpus = stdlib_corpus(16_000, ["json", "csv", "email", "http", "logging", "unittest"])
        blocks = [token_blocks([text], tokenizer, BLOCK) for text in corpus.values()]
        owners = np.concatenate([[name] * len(b) for name, b in zip(corpus, blocks, strict=True)])
        ids = np.concatenate(blocks)
        test = np.random.default_rng(seed).random(len(ids)) < 0.1
        return SimulationData(
            pool=TokenBlocks(ids[~test]),
            test=TokenBlocks(ids[test]),
            description=f"{int(test.sum())} held-out blocks of 6 standard-library packages (seed {seed})",
            owners=owners[~test].tolist(),
        )

    return Task(
        name="lora-lm",
        make_model=make_model,
        simulation_data=simulation_data,
        local_data=local_data,
        recipe=Recipe(metrics={}, derived={"perplexity": perplexity}, forward=forward, target="loss", maximize=False),
        exchange="lora",
        defaults={"optimizer": "adamw", "learning-rate": 0.002, "max-steps": 20, "batch-size": 8, "rounds": 5},
    )
