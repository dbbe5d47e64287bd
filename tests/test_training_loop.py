"""The shared torch loop and the torchrun helpers: early stopping, best state, schedules, sharding, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from marketplace_reco.training.distributed import (
    all_reduce_sum,
    init_distributed,
    shard_sampler,
    single_process_context,
    unwrap_model,
    wrap_model,
)
from marketplace_reco.training.loop import fit, warmup_linear_adamw

REPO_ROOT = Path(__file__).resolve().parents[1]


def _blobs(n: int, seed: int) -> TensorDataset:
    """Two Gaussian blobs in 2-D, linearly separable up to a little overlap."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    points = torch.randn(n, 2, generator=generator) * 0.7 + (labels[:, None] * 2.0 - 1.0) * 1.5
    return TensorDataset(points, labels)


def _loaders(batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    return (DataLoader(_blobs(128, 0), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)),
            DataLoader(_blobs(64, 1), batch_size=batch_size))


def test_fit_learns_records_history_and_keeps_the_best_state() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    train, val = _loaders()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.5, total_steps=6 * len(train))
    result = fit(model, train, val, epochs=6, optimizer=optimizer, scheduler=scheduler, patience=6,
                 monitor="val_loss", desc="blobs")

    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5, 6]
    assert set(result.history[0]) == {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"}
    assert result.history[-1]["val_accuracy"] > 0.9
    assert len({row["lr"] for row in result.history}) == 6  # stepped every batch, seen once per epoch
    best = min(result.history, key=lambda row: row["val_loss"])
    assert result.best_epoch == best["epoch"] and not result.stopped_early
    # The model holds the best epoch's weights: its validation loss is the recorded best.
    with torch.no_grad():
        points, labels = val.dataset.tensors
        assert nn.functional.cross_entropy(model(points), labels).item() == pytest.approx(best["val_loss"], rel=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, result.best_state[key])


def test_fit_stops_early_and_restores_an_earlier_epoch() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    train, val = _loaders()
    # A learning rate this large makes the validation loss bounce, so patience runs out.
    optimizer = torch.optim.SGD(model.parameters(), lr=200.0)
    result = fit(model, train, val, epochs=30, optimizer=optimizer, patience=2, monitor="val_loss")

    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 2
    assert result.history[result.best_epoch - 1]["val_loss"] == min(row["val_loss"] for row in result.history)


def test_fit_steps_an_epoch_scheduler_and_plateau_scheduler_on_the_monitored_value() -> None:
    model = nn.Linear(2, 2)
    train, val = _loaders()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    step = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    result = fit(model, train, val, epochs=3, optimizer=optimizer, scheduler=step, scheduler_interval="epoch",
                 patience=3)
    assert [row["lr"] for row in result.history] == [0.5, 0.25, 0.125]

    # The model now separates the blobs: validation accuracy stays at 1.0, a plateau from the first epoch on.
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=0)
    result = fit(model, train, val, epochs=3, optimizer=optimizer, scheduler=plateau, scheduler_interval="epoch",
                 patience=3, monitor="val_accuracy")
    assert [row["val_accuracy"] for row in result.history] == [1.0, 1.0, 1.0]
    assert [row["lr"] for row in result.history] == pytest.approx([1e-3, 1e-4, 1e-5])


def test_accumulated_batches_step_like_one_batch_of_their_size() -> None:
    def trained(batch_size: int, accumulation_steps: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Linear(2, 2)
        train = DataLoader(_blobs(64, 0), batch_size=batch_size)  # same order, no shuffle: comparable steps
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        fit(model, train, DataLoader(_blobs(32, 1), batch_size=32), epochs=2, optimizer=optimizer, patience=2,
            accumulation_steps=accumulation_steps, max_grad_norm=100.0)
        return model.state_dict()

    whole, accumulated = trained(16, 1), trained(8, 2)
    for key, value in whole.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-5, atol=1e-6)


def test_warmup_linear_adamw_warms_up_then_decays_to_zero() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    optimizer, scheduler = warmup_linear_adamw(model, learning_rate=1e-3, weight_decay=0.01, total_steps=10,
                                               warmup_fraction=0.2, part_learning_rates=[(model[2], 1e-2)])
    rates = []
    for _ in range(10):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert [row[0] for row in rates] == pytest.approx([5e-4, 1e-3, 8.75e-4, 7.5e-4, 6.25e-4, 5e-4, 3.75e-4, 2.5e-4,
                                                       1.25e-4, 0.0])
    assert rates[1][-1] == pytest.approx(1e-2)  # the part's own peak
    # Matrices decay, biases and norm weights do not.
    assert [(len(group["params"]), group["weight_decay"]) for group in optimizer.param_groups] == [
        (1, 0.01), (3, 0.0), (1, 0.01), (1, 0.0)]


def test_fit_rejects_an_empty_validation_set_and_bad_settings() -> None:
    model = nn.Linear(2, 2)
    train, _ = _loaders()
    empty = DataLoader(TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="validation loader yielded no samples"):
        fit(model, train, empty, epochs=1, optimizer=optimizer)
    with pytest.raises(ValueError, match="patience"):
        fit(model, train, train, epochs=1, optimizer=optimizer, patience=0)


def test_single_process_helpers_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        context = init_distributed()
        assert torch.get_num_threads() == threads  # OMP_NUM_THREADS is the user's choice, left alone
    finally:
        torch.set_num_threads(threads)
    assert (context.rank, context.world_size, context.is_main, context.is_distributed) == (0, 1, True, False)
    model = nn.Linear(2, 2)
    assert wrap_model(model, context) is model and unwrap_model(model) is model
    assert all_reduce_sum([1.5, 2.0], context) == [1.5, 2.0]
    context.barrier()
    context.close()


def test_shard_samplers_partition_evaluation_exactly_and_shuffle_training_per_epoch() -> None:
    dataset = _blobs(10, 0)
    contexts = [replace(single_process_context(), rank=rank, world_size=3, is_main=rank == 0) for rank in range(3)]
    shards = [list(shard_sampler(dataset, context, shuffle=False)) for context in contexts]
    assert sorted(i for shard in shards for i in shard) == list(range(10))

    sampler = shard_sampler(dataset, single_process_context(), shuffle=True, seed=0)
    sampler.set_epoch(1)  # type: ignore[attr-defined]
    first = list(sampler)
    sampler.set_epoch(2)  # type: ignore[attr-defined]
    assert sorted(first) == list(range(10)) and list(sampler) != first


_DDP_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from marketplace_reco.training.distributed import init_distributed, shard_sampler, unwrap_model, wrap_model
    from marketplace_reco.training.loop import fit, warmup_linear_adamw

    context = init_distributed()
    torch.manual_seed(context.rank)  # different initial weights per rank: DDP must broadcast rank 0's
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(96) % 2
    points = torch.randn(96, 2, generator=generator) + (labels[:, None] * 2.0 - 1.0) * 1.5
    train_set, val_set = TensorDataset(points[:64], labels[:64]), TensorDataset(points[64:], labels[64:])
    train = DataLoader(train_set, batch_size=8, sampler=shard_sampler(train_set, context, shuffle=True))
    val = DataLoader(val_set, batch_size=8, sampler=shard_sampler(val_set, context, shuffle=False))
    model = wrap_model(nn.Linear(2, 2), context)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    result = fit(model, train, val, epochs=4, optimizer=optimizer, patience=4, context=context)
    weights = [v.tolist() for v in unwrap_model(model).state_dict().values()]
    with open(sys.argv[1] + f"/rank{context.rank}.json", "w") as handle:
        json.dump({"history": result.history, "weights": weights, "world_size": context.world_size}, handle)
    context.close()
    """
)


def test_fit_under_torchrun_gives_every_rank_the_same_decisions_and_weights(tmp_path: Path) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(_DDP_WORKER, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
         str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["weights"] == ranks[1]["weights"]
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert [row[key] for row in ranks[0]["history"]] == [row[key] for row in ranks[1]["history"]]
    # Validation covers all 32 samples once: accuracies are multiples of 1/32.
    for row in ranks[0]["history"]:
        assert (row["val_accuracy"] * 32) == pytest.approx(round(row["val_accuracy"] * 32))
