"""DDP on 2 CPU processes with gloo (localhost only): data split, sync, equivalence, resume.

One spawn of two ranks does all the distributed work (process start-up dominates on a small
machine) and writes what each rank saw; the tests below check it against single-process runs.

"Same global batch": under DDP, step s averages the gradients of rank 0's batch s and rank 1's
batch s (each rank's loss is the mean over its own batch). The reference is one process that
builds the same two per-rank loaders (rank=r, world_size=2 given explicitly), and at step s
back-propagates (loss(b0) + loss(b1)) / 2 through one model: mathematically the same update. Only
the summation order of float32 gradients differs (gloo's ring allreduce vs autograd), so the
weights agree to rounding, not bitwise; see the tolerance in the test.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from alphaloom.model.dataset import ShardedWindowDataset
from alphaloom.model.losses import build_loss
from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from alphaloom.tasks.training.distributed import (
    RESULT_NAME,
    process_group,
    resolve_backend,
    spawn_local,
    torchrun_command,
    train_rank,
)
from alphaloom.tasks.training.progress import TrainProgress
from alphaloom.tasks.training.runtime import seed_everything
from alphaloom.tasks.training.train import (
    batch_loss,
    build_model,
    build_optimizer,
    build_scheduler,
    groups_by_date,
    train_loader,
)
from tests.helpers_train import TinyData, build_tiny_shards, tiny_config

WORLD = 2
# No dropout: the reference cannot replay each rank's dropout masks; pool_shards=1 gives 4
# pools, so each rank owns 2 and the padding that equalises batch counts stays within a rank.
DDP_OVERRIDES = (
    "model.mlp_dropout=0.0",
    "loader.pool_shards=1",
    "train.epochs=2",
    "train.patience=5",
    "train.max_batches_per_epoch=4",
    "train.checkpoint_every_batches=2",
)


# Parameters whose true gradient is identically zero: the attention-pooling score's bias shifts
# every time step's score equally, and a softmax over time ignores a shift. Their gradient is
# pure float32 rounding noise, which Adam normalises into lr-sized random steps that differ
# between any two summation orders, so they cannot be compared.
ZERO_GRADIENT = frozenset({"pool_score.bias"})


class InjectedFailure(RuntimeError):
    """Stands in for a crash of the whole job mid-epoch."""


def ddp_config() -> PipelineConfig:
    return tiny_config(*DDP_OVERRIDES)


def params_digest(parameters: list[torch.Tensor]) -> str:
    flat = torch.cat([p.detach().reshape(-1).cpu() for p in parameters])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def epoch_windows(cfg: PipelineConfig, info: ShardSetInfo, epoch: int) -> list[list[int]]:
    """(symbol, date) of every window the training loader of this rank yields in `epoch`."""
    loader = train_loader(info, cfg, torch.device("cpu"))
    loader.set_epoch(epoch)
    seen = []
    for batch in loader:
        seen += np.stack([batch["symbol"].numpy(), batch["date"].numpy()], 1).tolist()
    return seen


def rank_main(rank: int, shard_dir: str, out: str) -> None:
    """Everything one rank does; results go to `<out>/rank<r>.json` (spawn returns nothing)."""
    torch.set_num_threads(1)
    cfg = ddp_config()
    out_dir = Path(out)
    record: dict[str, Any] = {"digests": []}

    def after_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        record["digests"].append(
            params_digest([p for group in optimizer.param_groups for p in group["params"]])
        )

    def fail(event: TrainProgress) -> None:
        if event.phase == "batch" and (event.epoch, event.batch) == (1, 3):
            raise InjectedFailure("both ranks stop after step 3 of epoch 1")

    with process_group(cfg, "gloo") as ctx:
        from alphaloom.tasks.training.train import train_model

        info = ShardSetInfo.open(shard_dir)
        record["windows"] = [epoch_windows(cfg, info, epoch) for epoch in (0, 1)]
        hook = register_optimizer_step_post_hook(after_step)
        try:
            train_rank(ctx, shard_dir, cfg, str(out_dir / "full"))
        finally:
            hook.remove()
        try:
            train_model(shard_dir, cfg, out_dir / "crashed", progress=fail)
        except InjectedFailure:
            record["crashed"] = True
        resumed = train_model(shard_dir, cfg, out_dir / "crashed")
        record["resumed_at"] = list(resumed.resumed_at or ())
        private = out_dir / f"private{rank}"  # a checkpoint only rank 0 can see
        if rank == 0:
            private.mkdir()
            shutil.copy(out_dir / "crashed" / CHECKPOINT_NAME, private / CHECKPOINT_NAME)
        try:
            train_model(shard_dir, cfg, private)
        except RuntimeError as err:
            record["private_error"] = str(err)
        record["world"] = ctx.world_size
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyData:
    return build_tiny_shards(tmp_path_factory.mktemp("shards"), *DDP_OVERRIDES)


@pytest.fixture(scope="module")
def ddp_run(tiny: TinyData, tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("ddp")
    spawn_local(rank_main, WORLD, (str(tiny.shard_dir), str(out)))
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def union_reference(shard_dir: Path, cfg: PipelineConfig) -> nn.Module:
    """One process, one model: step s trains on the mean of both ranks' batch-s losses."""
    seed_everything(cfg.train.seed)
    info = ShardSetInfo.open(shard_dir)
    model = build_model(info, cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    loss = build_loss(cfg.loss)
    loaders = [
        ShardedWindowDataset(
            info,
            "train",
            batch_size=cfg.loader.batch_size,
            pool_shards=cfg.loader.pool_shards,
            min_valid_days=cfg.loader.min_valid_days,
            seed=cfg.train.seed,
            rank=rank,
            world_size=WORLD,
            equalize=cfg.loader.equalize,
            group_by_date=groups_by_date(cfg),
        )
        for rank in range(WORLD)
    ]
    assert loss.needs_days  # the default loss: its per-day ranking term sees each rank's days

    for epoch in range(cfg.train.epochs):
        model.train()
        for loader in loaders:
            loader.set_epoch(epoch)
        for step, batches in enumerate(zip(*loaders, strict=True)):
            if step == cfg.train.max_batches_per_epoch:
                break
            total = sum(batch_loss(model, loss, model(b).float(), b)["loss"] for b in batches)
            total = total / WORLD
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
        scheduler.step()
    return model


def test_ranks_see_disjoint_windows_that_cover_the_epoch(ddp_run, tiny: TinyData) -> None:
    _, ranks = ddp_run
    info = ShardSetInfo.open(tiny.shard_dir)
    every = ShardedWindowDataset(info, "train", shuffle=False, min_valid_days=10, batch_size=4096)
    assert tiny.cfg.loader.min_valid_days == 10
    expected = {
        (int(s), int(d)) for b in every for s, d in zip(b["symbol"], b["date"], strict=True)
    }
    for epoch in (0, 1):
        seen = [ranks[r]["windows"][epoch] for r in range(WORLD)]
        assert len(seen[0]) > 0 and len(seen[1]) > 0
        sets = [{tuple(w) for w in s} for s in seen]
        assert sets[0].isdisjoint(sets[1])
        assert sets[0] | sets[1] == expected
        batches = [math.ceil(len(s) / tiny.cfg.loader.batch_size) for s in seen]
        assert batches[0] == batches[1]  # equal batch counts: no rank waits on a collective


def test_parameters_are_identical_on_both_ranks_after_every_step(ddp_run) -> None:
    _, ranks = ddp_run
    cfg = ddp_config()
    digests = [r["digests"] for r in ranks]
    assert len(digests[0]) == cfg.train.epochs * cfg.train.max_batches_per_epoch
    assert digests[0] == digests[1]
    assert len(set(digests[0])) == len(digests[0])  # and they did change at every step


def test_ddp_matches_a_single_process_on_the_union_of_both_ranks_batches(
    ddp_run, tiny: TinyData
) -> None:
    out, _ = ddp_run
    cfg = ddp_config()
    reference = union_reference(tiny.shard_dir, cfg)
    last = load_checkpoint(out / "full" / CHECKPOINT_NAME)
    assert last is not None and last["state"]["finished"]
    ref_state = reference.state_dict()
    compared = [k for k in ref_state if k not in ZERO_GRADIENT]
    assert len(compared) == len(ref_state) - len(ZERO_GRADIENT)  # the names still exist
    diff = max((last["model"][k] - ref_state[k]).abs().max().item() for k in compared)
    moved = max((last["model"][k] - v).abs().max().item() for k, v in init_state(tiny).items())
    # Adam moves a weight by at most ~lr per step, so 8 steps move weights by up to ~1e-2
    # (`moved`); float32 reduction-order noise, amplified where Adam divides by a tiny second
    # moment, stays 2+ orders of magnitude below that. A wrong gradient average (sum instead
    # of mean, one rank's batch only) changes the weights by the size of `moved`.
    assert moved > 1e-3
    assert diff < 1e-4, f"DDP vs union reference: max |dw| = {diff:.2e} (training moved {moved})"


def init_state(tiny: TinyData) -> dict[str, torch.Tensor]:
    seed_everything(ddp_config().train.seed)
    return build_model(ShardSetInfo.open(tiny.shard_dir), ddp_config()).state_dict()


def test_a_crashed_ddp_job_resumes_from_the_checkpoint_to_the_same_weights(ddp_run) -> None:
    out, ranks = ddp_run
    assert all(r.get("crashed") for r in ranks)
    assert ranks[0]["resumed_at"] == ranks[1]["resumed_at"] == [1, 2]
    full = load_checkpoint(out / "full" / CHECKPOINT_NAME)
    resumed = load_checkpoint(out / "crashed" / CHECKPOINT_NAME)
    assert full is not None and resumed is not None
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    assert (
        full["state"]["history"][-1]["valid/rank_ic"]
        == resumed["state"]["history"][-1]["valid/rank_ic"]
    )


def test_rank_zero_writes_the_result_the_launcher_reads(ddp_run) -> None:
    out, ranks = ddp_run
    assert ranks[0]["world"] == WORLD
    result = json.loads((out / "full" / RESULT_NAME).read_text())
    assert result["world_size"] == WORLD and result["backend"] == "gloo"
    assert len(result["history"]) == ddp_config().train.epochs


def test_backend_follows_the_device() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    with pytest.raises(ValueError, match="nccl"):
        resolve_backend("nccl", torch.device("cpu"))


def test_torchrun_command_binds_the_rendezvous_to_localhost() -> None:
    command = torchrun_command(2, ["--config", "c.yaml"], port=29511)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert "--master-addr=127.0.0.1" in command and "--nproc-per-node=2" in command
    assert command[-4:] == ["-m", "alphaloom.tasks.training.distributed", "--config", "c.yaml"][-4:]
    with pytest.raises(ValueError, match="nproc_per_node"):
        torchrun_command(0, [], port=1)


def test_process_group_outside_torchrun_names_what_is_missing(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"), process_group(ddp_config()):
        pass


def test_ranks_refuse_to_start_from_a_checkpoint_only_one_of_them_sees(ddp_run) -> None:
    _, ranks = ddp_run
    for record in ranks:
        assert "filesystem every rank sees" in record["private_error"]
