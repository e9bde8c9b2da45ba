"""Built-in task `lm`: a causal language model, trained from scratch or from a partner's checkpoint.

- Built-in model (no `--model-dir`): a small Llama (2 layers, hidden 128, byte-level vocabulary of 256)
  that trains on a 2-core CPU in minutes. Every node and the coordinator build it from a fixed seed,
  so the frozen base of a LoRA run (`--exchange lora`) has the same digest everywhere.
- Checkpoint mode (`--model-dir DIR`): any Hugging Face causal LM saved with `save_pretrained`, with its
  tokenizer beside it, loaded in float32. Nothing is ever downloaded.

Simulation data is the Python standard library's own source (`text.stdlib_corpus`): 16 packages and
modules, each an owner for `--partition natural`, with a seeded held-out sample of blocks from every
owner as the test set. A deployed node reads its own `*.txt` / `*.jsonl` folder (`text.read_text_folder`).

Each predicted token counts as one example: the recipe's forward flattens (batch, position) into rows,
so losses and metrics are token-weighted. Reported metrics: `loss` (nats per token), `perplexity` and,
for the byte-level tokenizer, `bits_per_byte`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from federation.errors import TaskError
from federation.tasks.api import LocalData, SimulationData, Task, TaskOptions, task_factory
from federation.tasks.text import (
    TokenBlocks,
    byte_tokenizer,
    is_byte_level,
    read_text_folder,
    stdlib_corpus,
    token_blocks,
)
from node import Recipe, TrainConfig, bits_per_byte, cross_entropy, make_optimizer, perplexity

BLOCK = 128
"""Tokens per training example (the longest block; a checkpoint with a shorter context gets shorter blocks)."""

MODEL_SEED = 20240611
"""Seed of the built-in model's initial weights: fixed, so every node builds the identical model."""

SIM_OWNERS = (
    "argparse", "asyncio", "collections", "concurrent", "ctypes", "dataclasses", "email", "http",
    "importlib", "inspect", "json", "logging", "multiprocessing", "typing", "unittest", "urllib",
)  # fmt: skip
"""Standard-library owners of the simulation corpus: shipped with every CPython (unlike tkinter or
distutils), mostly library code rather than data tables, and each larger than `SIM_BYTES_PER_OWNER`
on Python 3.11, so a natural split gets owners of equal size."""

SIM_BYTES_PER_OWNER = 48_000
"""Cap on each owner's text: 16 x 48 kB is about 6,000 blocks of 128 bytes, enough for the default
run (4 nodes x 10 rounds x 60 steps x 8 blocks) to make about 4 passes without memorising."""

TEST_BLOCKS_PER_OWNER = 16
"""Held-out blocks drawn from each owner (256 in all: central evaluation takes well under a second)."""

ROUND_WARMUP_STEPS = 10
"""Optimizer steps over which each round's step size ramps up to the round's learning rate."""

LOCAL_VAL_FRACTION = 0.1
"""Share of a deployed node's blocks kept for its local validation."""


# ---- model -----------------------------------------------------------------------------------------


def builtin_config() -> Any:
    """The built-in model's `transformers.LlamaConfig`: byte vocabulary, 2 layers, hidden 128, 4 heads."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2 * BLOCK,
        tie_word_embeddings=False,
        # a byte-level vocabulary has no special tokens (Llama's defaults would claim bytes 1 and 2)
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def make_builtin_model() -> nn.Module:
    """A freshly initialised built-in Llama in float32, identical on every call (seeded, RNG state restored)."""
    from transformers import LlamaForCausalLM

    # fork_rng: the caller's random stream (shuffling, LoRA init) is left exactly as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        model = LlamaForCausalLM(builtin_config())
    return model.float()


def checkpoint_loader(model_dir: Path) -> Callable[[], nn.Module]:
    """`make_model` for a checkpoint folder: `AutoModelForCausalLM.from_pretrained(model_dir)` in float32.

    The folder is checked now (a TaskError says what is wrong); the weights are read on each call,
    so every node builds the same model from the same files.
    """
    from transformers import AutoConfig

    if not model_dir.is_dir():
        raise TaskError(f"model-dir {model_dir} is not a folder")
    if not (model_dir / "config.json").is_file():
        raise TaskError(f"model-dir {model_dir} is not a Hugging Face checkpoint (it has no config.json)")
    try:
        AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise TaskError(f"model-dir {model_dir}: cannot read its config.json ({exc})") from exc

    def make_model() -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)

    return make_model


def checkpoint_tokenizer(model_dir: Path) -> Any:
    """The tokenizer saved beside the checkpoint (`AutoTokenizer.from_pretrained`, local files only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise TaskError(f"model-dir {model_dir}: cannot load its tokenizer ({exc}); save it beside the model") from exc


def context_length(model_dir: Path) -> int:
    """Block length for a checkpoint: `BLOCK`, or less when the model's context is shorter."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    return min(BLOCK, limit) if isinstance(limit, int) and limit >= 2 else BLOCK


# ---- training recipe -------------------------------------------------------------------------------


def lm_forward(model: nn.Module, batch: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token prediction: `(logits (B*(T-1), V), targets (B*(T-1),))`, one row per predicted token.

    The model reads tokens 0..T-2 only: causal attention gives the same logits for those positions as
    the whole block would, the last position (which has no target) is never computed, and the logits
    reshape without a copy. They still take B*(T-1)*V floats: about 8 MB for a batch of 16 with the
    byte vocabulary, but some 1 GB per 16 x 128 batch for a 128k-token checkpoint vocabulary, so use a
    small batch size (and evaluation batch) with such a checkpoint.
    """
    ids = batch.to(device, non_blocking=True)
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    return logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)


def round_warmup_optimizer(params: Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The run config's optimizer (sgd, adam or adamw), its step size ramped up over its first `ROUND_WARMUP_STEPS`.

    A node builds a fresh optimizer every round, so Adam's moment estimates never survive a round, and
    a fresh Adam's first steps are sign-like steps of the full learning rate on every weight: taken
    right after averaging, they throw away much of what the round before gained. Ramping the step
    size inside each round avoids that (measured on the built-in run with 30 steps of 16: held-out
    2.22 bits per byte after 10 rounds instead of 2.66).
    """
    optimizer = make_optimizer(params, config)
    peaks = [group["lr"] for group in optimizer.param_groups]
    steps = itertools.count(1)

    def ramp(opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        scale = min(1.0, next(steps) / ROUND_WARMUP_STEPS)
        for group, peak in zip(opt.param_groups, peaks, strict=True):
            group["lr"] = peak * scale

    optimizer.register_step_pre_hook(ramp)
    return optimizer


def make_recipe(byte_level: bool) -> Recipe:
    """Token cross-entropy, with perplexity and (for a byte-level tokenizer) bits per byte; lower loss is better."""
    derived = {"perplexity": perplexity, **({"bits_per_byte": bits_per_byte} if byte_level else {})}
    return Recipe(
        loss=cross_entropy,
        metrics={},
        derived=derived,
        forward=lm_forward,
        make_optimizer=round_warmup_optimizer,
        target="loss",
        maximize=False,
    )


# ---- data ------------------------------------------------------------------------------------------


def held_out_split(owners: np.ndarray, per_owner: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool indices, test indices): a seeded sample of `per_owner` rows of each owner is held out.

    Every owner keeps at least one row in the pool, so a natural split still sees every owner.
    """
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for owner in sorted(set(owners.tolist())):
        rows = np.flatnonzero(owners == owner)
        test.append(rng.choice(rows, size=min(per_owner, len(rows) - 1), replace=False))
    held = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    pool = np.setdiff1d(np.arange(len(owners)), held)
    return pool, held


def simulation_recipe(tokenizer: Any, block: int) -> Callable[[int], SimulationData]:
    """`seed -> SimulationData` over the standard-library corpus, tokenized by `tokenizer` into `block`-token rows."""

    def simulation_data(seed: int) -> SimulationData:
        corpus = stdlib_corpus(SIM_BYTES_PER_OWNER, SIM_OWNERS)
        per_owner = [token_blocks([text], tokenizer, block) for text in corpus.values()]
        ids = np.concatenate(per_owner)
        owners = np.asarray([o for o, b in zip(corpus, per_owner, strict=True) for _ in range(len(b))], dtype=object)
        pool, test = held_out_split(owners, TEST_BLOCKS_PER_OWNER, seed)
        return SimulationData(
            pool=TokenBlocks(ids[pool]),
            test=TokenBlocks(ids[test]),
            description=(
                f"Python {_python_version()} standard-library source: {len(test)} held-out blocks of {block} tokens "
                f"({TEST_BLOCKS_PER_OWNER} from each of {len(corpus)} packages, seed {seed}), never given to any node"
            ),
            owners=[str(o) for o in owners[pool]],
        )

    return simulation_data


def local_recipe(tokenizer: Any, block: int) -> Callable[[Path], LocalData]:
    """`data_dir -> LocalData`: the partner's text folder as `block`-token rows, a seeded 10% kept for validation."""

    def local_data(data_dir: Path) -> LocalData:
        ids = token_blocks(read_text_folder(data_dir), tokenizer, block)
        if len(ids) < 2:
            raise TaskError(
                f"data-dir {data_dir}: {len(ids)} block(s) of {block} tokens; need at least 2 (training and validation)"
            )
        order = np.random.default_rng(0).permutation(len(ids))
        n_val = max(1, int(LOCAL_VAL_FRACTION * len(ids)))
        return LocalData(train=TokenBlocks(ids[np.sort(order[n_val:])]), val=TokenBlocks(ids[np.sort(order[:n_val])]))

    return local_data


def _python_version() -> str:
    import platform

    return platform.python_version()


# ---- the task --------------------------------------------------------------------------------------

DEFAULTS: dict[str, Any] = {
    "optimizer": "adamw",
    "learning-rate": 3e-3,
    "lr-schedule": "cosine",
    "warmup-rounds": 1,
    "local-epochs": 1,
    "max-steps": 60,
    "batch-size": 8,
    "grad-clip": 1.0,
    "rounds": 10,
}
"""Run-config values for the built-in model, trained from scratch; a user's flags override them.

Measured with 4 nodes on a natural split (held-out bits per byte after 10 rounds, same 2.4M tokens):
- the optimizer's step size ramped inside each round (`round_warmup_optimizer`): 2.22 instead of 2.66;
- one warm-up round: 2.22 instead of 2.59 without; peak learning rate 3e-3 beats 2e-3 (2.32) and 6e-3 (2.52);
- batches of 8 for 60 steps beat 16 for 30 (2.14 vs 2.22) and 4 for 120 (2.24): at this size training is
  limited by the number of sequential steps, and a batch of 8 costs about half the time of 16 on a CPU.
A 4-node round takes about 17 s on 2 shared CPU cores (2 nodes at a time, 1 thread each)."""

CHECKPOINT_DEFAULTS: dict[str, Any] = {**DEFAULTS, "learning-rate": 1e-4, "warmup-rounds": 0}
"""For a pretrained checkpoint: fine-tuning wants a far smaller step than training from scratch (the
batch of 8 also keeps the batch x block x vocabulary logits of a real vocabulary small)."""


def tokenizer_for(options: TaskOptions) -> Any:
    """The tokenizer of the task `make_task(options)` builds: the byte tokenizer, or the checkpoint's own.

    `weft export` saves it beside an exported model (federation.export looks this function up by name).
    """
    return byte_tokenizer() if options.model_dir is None else checkpoint_tokenizer(Path(options.model_dir))


@task_factory
def make_task(options: TaskOptions) -> Task:
    """The `lm` task: the built-in byte-level Llama, or the causal LM in `options.model_dir`."""
    if options.model_dir is None:
        make_model, block, defaults = make_builtin_model, BLOCK, DEFAULTS
    else:
        model_dir = Path(options.model_dir)
        make_model, block, defaults = checkpoint_loader(model_dir), context_length(model_dir), CHECKPOINT_DEFAULTS
    tokenizer = tokenizer_for(options)
    return Task(
        name="lm",
        make_model=make_model,
        simulation_data=simulation_recipe(tokenizer, block),
        local_data=local_recipe(tokenizer, block),
        recipe=make_recipe(is_byte_level(tokenizer)),
        defaults=defaults,
        exchange="all",
    )
