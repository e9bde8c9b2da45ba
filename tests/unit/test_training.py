"""node/training.py and node/recipe.py: exact numbers against hand-written PyTorch and hand arithmetic.

Every expected value is either worked out by hand in the test or produced by a plain PyTorch loop
written here from the documented contract (seeded DataLoader shuffle, `torch.manual_seed(seed)`
before the first batch, zero_grad / forward / loss / backward / clip / step), and compared exactly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from node.recipe import CLASSIFICATION, Recipe, StepContext, bits_per_byte, cross_entropy, perplexity
from node.runtime import DEFAULT_METRIC_ALLOWLIST
from node.training import OPTIMIZERS, TrainConfig, evaluate_local, make_optimizer, train_local

CPU = torch.device("cpu")
N, FEATURES, CLASSES = 10, 4, 3
SEED = 1234


def make_model() -> nn.Sequential:
    """A small MLP with dropout (so the global RNG seeding matters), deterministically initialised."""
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Dropout(0.25), nn.Linear(8, CLASSES))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def data(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(11)
    return TensorDataset(torch.randn(n, FEATURES, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


def reference_train(
    model: nn.Module, dataset: TensorDataset, config: TrainConfig, optimizer: torch.optim.Optimizer, seed: int
) -> tuple[float, int]:
    """The documented loop in plain PyTorch; returns (example-weighted mean loss, clipped steps)."""
    model.train()
    torch.manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size=config.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    total, count, clipped = 0.0, 0, 0
    for _ in range(config.local_epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            if config.grad_clip:
                norm = nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
                clipped += int(norm > config.grad_clip)
            optimizer.step()
            total += float(loss.detach().double()) * len(y)
            count += len(y)
    return total / count, clipped


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ---- train_local against a hand-written loop -----------------------------------------------------


@pytest.mark.parametrize(
    ("config", "reference_optimizer"),
    [
        (
            TrainConfig(optimizer="adam", learning_rate=0.01, beta1=0.8, beta2=0.95, local_epochs=2, batch_size=4),
            lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.95), weight_decay=0.0),
        ),
        (
            TrainConfig(
                optimizer="adamw",
                learning_rate=0.02,
                beta1=0.85,
                beta2=0.9,
                weight_decay=0.1,
                grad_clip=0.05,
                local_epochs=2,
                batch_size=4,
            ),
            lambda ps: torch.optim.AdamW(ps, lr=0.02, betas=(0.85, 0.9), weight_decay=0.1),
        ),
        (
            TrainConfig(
                optimizer="sgd", learning_rate=0.1, momentum=0.7, weight_decay=0.01, local_epochs=3, batch_size=3
            ),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.7, weight_decay=0.01),
        ),
    ],
    ids=["adam", "adamw-decay-clip", "sgd-momentum"],
)
def test_train_local_equals_a_plain_pytorch_loop(config: TrainConfig, reference_optimizer) -> None:
    # prepare: two identical models, the same data
    ours, theirs, start = make_model(), make_model(), make_model()
    dataset = data()

    # execute
    stats = train_local(ours, dataset, config, CPU, seed=SEED)
    expected_loss, clipped = reference_train(
        theirs, dataset, config, reference_optimizer(list(theirs.parameters())), SEED
    )

    # assert: bit-identical parameters and the same example-weighted loss over every step
    assert_same_parameters(ours, theirs)
    assert any(not torch.equal(p, q) for p, q in zip(ours.parameters(), start.parameters(), strict=True))
    assert stats.num_examples == N  # the dataset size, not examples x epochs
    assert stats.loss == pytest.approx(expected_loss, rel=1e-12)
    assert set(stats.metrics) == {"loss", "accuracy"}
    if config.grad_clip:
        assert clipped > 0, "the clip threshold must be small enough to act, else the test proves nothing"


def test_the_seed_changes_the_result() -> None:
    # Guards the equality tests above: a different seed (shuffle order, dropout) gives other weights.
    config = TrainConfig(optimizer="adam", learning_rate=0.01, local_epochs=2, batch_size=4)
    a, b = make_model(), make_model()
    train_local(a, data(), config, CPU, seed=SEED)
    train_local(b, data(), config, CPU, seed=SEED + 1)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


class CountingSGD(torch.optim.SGD):
    steps = 0

    def step(self, closure=None):
        CountingSGD.steps += 1
        return super().step(closure)


@pytest.mark.parametrize(
    ("max_steps", "epochs", "steps", "seen"),
    [
        (3, 5, 3, 10),  # 10 examples in batches of 4: 3 steps = exactly the first epoch (4 + 4 + 2)
        (2, 5, 2, 8),  # stops inside the first epoch
        (5, 5, 5, 18),  # crosses into the second epoch: 10 + 4 + 4
        (0, 2, 6, 20),  # no cap: 2 epochs of 3 steps
    ],
)
def test_max_steps_caps_the_optimizer_steps(max_steps: int, epochs: int, steps: int, seen: int) -> None:
    CountingSGD.steps = 0
    losses: list[float] = []

    def recorded_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = cross_entropy(outputs, targets)
        losses.append(float(loss.detach().double()) * len(targets))
        return loss

    recipe = Recipe(loss=recorded_loss, make_optimizer=lambda ps, c: CountingSGD(ps, lr=c.learning_rate))
    config = TrainConfig(local_epochs=epochs, max_steps=max_steps, batch_size=4)

    stats = train_local(make_model(), data(), config, CPU, seed=SEED, recipe=recipe)

    assert CountingSGD.steps == steps
    assert len(losses) == steps
    assert stats.num_examples == N  # still the FedAvg weight: the local dataset size
    assert stats.loss == pytest.approx(sum(losses) / seen, rel=1e-12)  # averaged over the examples seen


class Stream(IterableDataset):
    """An iterable dataset of `n` (features, label) pairs; iterable again for every epoch."""

    def __init__(self, n: int) -> None:
        self.inner = data(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.inner[i] for i in range(len(self.inner)))


def test_iterable_dataset_counts_the_examples_of_one_epoch() -> None:
    seen: list[int] = []

    def counting_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append(len(targets))
        return cross_entropy(outputs, targets)

    config = TrainConfig(local_epochs=2, batch_size=4)
    stats = train_local(make_model(), Stream(10), config, CPU, seed=SEED, recipe=Recipe(loss=counting_loss))
    assert seen == [4, 4, 2, 4, 4, 2]  # two epochs went through, unshuffled
    assert stats.num_examples == 10


def test_iterable_dataset_equals_the_map_style_loop_without_shuffling() -> None:
    # An iterable dataset is never shuffled: the same batches in stream order as a plain loop.
    config = TrainConfig(optimizer="sgd", learning_rate=0.1, momentum=0.5, local_epochs=2, batch_size=4)
    ours, theirs = make_model(), make_model()
    train_local(ours, Stream(10), config, CPU, seed=SEED)

    torch.manual_seed(SEED)
    theirs.train()
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.5)
    for _ in range(2):
        for x, y in DataLoader(data(10), batch_size=4, shuffle=False):
            optimizer.zero_grad()
            nn.functional.cross_entropy(theirs(x), y).backward()
            optimizer.step()
    assert_same_parameters(ours, theirs)


# ---- recipes: evaluation, custom train step, frozen parameters ----------------------------------


def fixed_linear() -> nn.Linear:
    """y = x0 - x1 + 0.5."""
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
        model.bias.copy_(torch.tensor([0.5]))
    return model


def regression_data() -> TensorDataset:
    # outputs 1.5, -0.5, 2.5, 0.5, 4.5 against a target of 0.5: errors 1, -1, 2, 0, 4
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0], [3.0, -1.0]])
    return TensorDataset(x, torch.full((5, 1), 0.5))


def mae(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs - targets).abs().mean()


REGRESSION = Recipe(
    loss=nn.functional.mse_loss,
    metrics={"mae": mae},
    derived={"rmse": lambda m: math.sqrt(m["loss"]), "mae_x10": lambda m: 10 * m["mae"]},
    target="rmse",
    maximize=False,
)


def test_evaluate_local_weights_batches_by_their_size() -> None:
    # batches of 2, 2, 1: squared errors (1, 1), (4, 0), (16); absolute errors (1, 1), (2, 0), (4)
    stats = evaluate_local(fixed_linear(), regression_data(), CPU, batch_size=2, recipe=REGRESSION)

    assert stats.num_examples == 5
    assert stats.metrics == {"loss": 22 / 5, "mae": 8 / 5, "rmse": math.sqrt(22 / 5), "mae_x10": 10 * (8 / 5)}
    assert stats.loss != (1 + 2 + 16) / 3  # what an unweighted mean of batch means would give
    assert stats.prefixed("eval") == {
        "eval_loss": 22 / 5,
        "eval_mae": 8 / 5,
        "eval_rmse": math.sqrt(22 / 5),
        "eval_mae_x10": 16.0,
    }


def test_evaluate_local_does_not_change_the_model() -> None:
    model = fixed_linear()
    evaluate_local(model, regression_data(), CPU, batch_size=2, recipe=REGRESSION)
    assert torch.equal(model.weight, torch.tensor([[1.0, -1.0]]))
    assert torch.equal(model.bias, torch.tensor([0.5]))


def test_evaluate_local_classification_accuracy_by_hand() -> None:
    # logits = x: the predicted class is the arg-max column of x
    model = nn.Identity()
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    y = torch.tensor([0, 1, 0, 2, 1])  # right, right, wrong, wrong, right
    stats = evaluate_local(model, TensorDataset(x, y), CPU, batch_size=4)
    assert stats.accuracy == 3 / 5  # batch means 2/4 and 1/1, weighted 4:1 (unweighted: 0.75)
    assert stats.loss == pytest.approx(float(nn.functional.cross_entropy(x.double(), y)), rel=1e-6)
    assert stats.num_examples == 5


def test_custom_train_step_is_used_and_its_loss_is_averaged() -> None:
    calls: list[tuple[int, type]] = []

    def train_step(model: nn.Module, batch, ctx: StepContext):
        _, y = batch
        calls.append((len(y), type(ctx.optimizer)))
        assert ctx.device == CPU
        assert ctx.loss is nn.functional.mse_loss
        outputs, targets = ctx.forward(model, batch, ctx.device)
        scripted = torch.tensor(float(len(calls)))  # 1, 2, 3, ... per call
        return scripted, outputs.detach(), targets  # no optimizer step: the model must stay as it is

    recipe = Recipe(
        loss=nn.functional.mse_loss,
        metrics={"mae": mae},
        derived={"rmse": lambda m: math.sqrt(m["loss"])},
        train_step=train_step,
        target="mae",
    )
    model = fixed_linear()
    config = TrainConfig(optimizer="adam", batch_size=2, local_epochs=2)

    stats = train_local(model, regression_data(), config, CPU, seed=0, recipe=recipe)

    assert calls == [(2, torch.optim.Adam), (2, torch.optim.Adam), (1, torch.optim.Adam)] * 2
    # losses 1..6 for batches of 2, 2, 1, 2, 2, 1 examples
    expected = (1 * 2 + 2 * 2 + 3 * 1 + 4 * 2 + 5 * 2 + 6 * 1) / 10
    assert stats.metrics["loss"] == pytest.approx(expected, rel=1e-12)
    assert stats.metrics["rmse"] == pytest.approx(math.sqrt(expected), rel=1e-12)
    assert stats.metrics["mae"] == pytest.approx(8 / 5, rel=1e-6)  # each epoch: the fixed model's mae
    assert stats.num_examples == 5
    # the default step did not run as well
    assert torch.equal(model.weight, torch.tensor([[1.0, -1.0]]))
    assert torch.equal(model.bias, torch.tensor([0.5]))


def test_frozen_parameters_are_not_optimised() -> None:
    model = make_model()
    frozen = {"0.weight", "0.bias"}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    before = copy.deepcopy(model.state_dict())
    given: list[list[nn.Parameter]] = []

    def recording(params, config):
        params = list(params)
        given.append(params)
        return make_optimizer(params, config)

    config = TrainConfig(optimizer="adamw", weight_decay=0.5, learning_rate=0.05, local_epochs=2, batch_size=4)
    train_local(model, data(), config, CPU, seed=SEED, recipe=Recipe(make_optimizer=recording))

    assert len(given) == 1
    assert [id(p) for p in given[0]] == [id(model[3].weight), id(model[3].bias)]
    after = model.state_dict()
    for name in frozen:
        assert torch.equal(after[name], before[name]), name
    for name in ("3.weight", "3.bias"):
        assert not torch.equal(after[name], before[name]), name


# ---- make_optimizer --------------------------------------------------------------------------------


def test_make_optimizer_passes_every_hyperparameter() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(params, TrainConfig(optimizer="sgd", learning_rate=0.3, momentum=0.25, weight_decay=0.01))
    assert type(sgd) is torch.optim.SGD
    assert {k: sgd.param_groups[0][k] for k in ("lr", "momentum", "weight_decay")} == {
        "lr": 0.3,
        "momentum": 0.25,
        "weight_decay": 0.01,
    }
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        opt = make_optimizer(
            params, TrainConfig(optimizer=name, learning_rate=0.002, beta1=0.5, beta2=0.75, weight_decay=0.2)
        )
        assert type(opt) is cls
        group = opt.param_groups[0]
        assert (group["lr"], group["betas"], group["weight_decay"]) == (0.002, (0.5, 0.75), 0.2)
        assert group["params"] == params
    assert OPTIMIZERS == ("sgd", "adam", "adamw")


# ---- TrainConfig -------------------------------------------------------------------------------------


def test_train_config_wire_keys() -> None:
    assert TrainConfig.keys() == {
        "local-epochs",
        "max-steps",
        "optimizer",
        "learning-rate",
        "momentum",
        "weight-decay",
        "beta1",
        "beta2",
        "grad-clip",
        "batch-size",
        "seed",
        "payload",
        "error-feedback",
    }
    config = TrainConfig(optimizer="adamw", max_steps=7, grad_clip=1.5, beta2=0.98)
    wire = config.to_config()
    assert (wire["optimizer"], wire["max-steps"], wire["grad-clip"], wire["beta2"]) == ("adamw", 7, 1.5, 0.98)
    assert TrainConfig.from_config(wire) == config


def test_train_config_takes_an_integer_for_a_float() -> None:
    config = TrainConfig.from_config({"learning-rate": 1, "grad-clip": 2})
    assert (config.learning_rate, config.grad_clip) == (1.0, 2.0)
    assert type(config.learning_rate) is float and type(config.grad_clip) is float


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"lr": 0.1}, r"unknown training instruction\(s\): \['lr'\]"),
        ({"optimizer": "adam", "nesterov": True, "amsgrad": 1}, r"\['amsgrad', 'nesterov'\]"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of sgd, adam, adamw"),
        ({"optimizer": 1}, "optimizer must be text, got 1"),
        ({"max-steps": True}, "max-steps must be an integer, got True"),
        ({"max-steps": 2.0}, "max-steps must be an integer, got 2.0"),
        ({"grad-clip": False}, "grad-clip must be a number, got False"),
        ({"beta1": "0.9"}, "beta1 must be a number, got '0.9'"),
        ({"weight-decay": -0.1}, "weight-decay must be >= 0"),
        ({"weight-decay": float("nan")}, "weight-decay must be >= 0"),
        ({"grad-clip": -1.0}, "grad-clip must be >= 0"),
        ({"max-steps": -1}, "max-steps must be >= 0"),
        ({"beta2": 1.0}, "beta1 and beta2 must be in"),
        ({"learning-rate": float("inf")}, "learning-rate must be a positive number"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"seed": 2**63}, "seed must be a non-negative integer"),
    ],
)
def test_train_config_from_config_errors_name_the_key(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_config(config)


# ---- Recipe ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metrics": {"loss": mae}}, "metric names must be distinct and not 'loss'"),
        ({"metrics": {"mae": mae}, "derived": {"mae": lambda m: 0.0}, "target": "mae"}, "must be distinct"),
        ({"derived": {"loss": perplexity}}, "must be distinct"),
        ({"target": "f1"}, r"target metric 'f1' is not one of \['accuracy', 'loss'\]"),
        ({"metrics": {"mae": mae}}, "target metric 'accuracy' is not one of"),
    ],
)
def test_recipe_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Recipe(**kwargs)


def test_recipe_allowlist_has_every_phase_of_every_name() -> None:
    assert REGRESSION.metric_names() == {"loss", "mae", "rmse", "mae_x10"}
    assert REGRESSION.allowlist() == {
        f"{phase}_{name}" for phase in ("train", "eval", "personal") for name in ("loss", "mae", "rmse", "mae_x10")
    }
    assert len(REGRESSION.allowlist()) == 12
    assert (
        CLASSIFICATION.allowlist()
        == DEFAULT_METRIC_ALLOWLIST
        == {
            "train_loss",
            "train_accuracy",
            "eval_loss",
            "eval_accuracy",
            "personal_loss",
            "personal_accuracy",
        }
    )


def test_recipe_metrics_are_read_only_copies() -> None:
    metrics = {"mae": mae}
    recipe = Recipe(metrics=metrics, target="mae")
    metrics["other"] = mae
    assert set(recipe.metrics) == {"mae"}
    with pytest.raises(TypeError):
        recipe.metrics["x"] = mae  # type: ignore[index]


def test_derived_language_model_metrics() -> None:
    assert perplexity({"loss": 2.0}) == math.exp(2.0)
    assert perplexity({"loss": 0.0}) == 1.0
    assert perplexity({"loss": 1e6}) == math.exp(700.0)  # capped, stays finite
    assert bits_per_byte({"loss": 3 * math.log(2)}) == pytest.approx(3.0, rel=1e-15)
    assert bits_per_byte({"loss": math.log(256)}) == pytest.approx(8.0, rel=1e-15)
