"""Training under torch.distributed (DDP): process group, torchrun entry point and launcher.

Why torchrun: it is PyTorch's own launcher (rendezvous, per-worker RANK/WORLD_SIZE/LOCAL_RANK,
elastic restarts), so nothing here re-implements process management. Two ways in:

* `alphaloom train-ddp --nproc-per-node N` runs the whole pipeline with the training task
  launched as `torchrun ... -m alphaloom.tasks.training.distributed` on this machine (bound to
  127.0.0.1); the parent then evaluates and registers the model rank 0 wrote.
* `torchrun --nnodes M --nproc-per-node N ... -m alphaloom.tasks.training.distributed
  --config C --shards S` runs the training step on any cluster torchrun can reach (the shard
  set and the checkpoint directory must be on a filesystem every node sees).

The training loop itself is tasks/training/train.py's `train_model`, which is rank-aware: the
loader takes (rank, world size) from the process group, rank 0 validates, checkpoints and logs
to MLflow, and every rank resumes from rank 0's checkpoint. Backend: NCCL when training on CUDA,
gloo on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from prefect import task
from prefect.cache_policies import NO_CACHE

from alphaloom.tasks.common.config import PipelineConfig, load_config
from alphaloom.tasks.common.storage import FsPath, Location, write_text_atomic
from alphaloom.tasks.orchestration.retries import retry_transient
from alphaloom.tasks.training.checkpoint import BEST_STATE_NAME, load_weights
from alphaloom.tasks.training.runtime import select_device
from alphaloom.tasks.training.train import TrainResult, build_model, model_dims, train_model

log = logging.getLogger(__name__)

Backend = Literal["auto", "gloo", "nccl"]
RESULT_NAME = "ddp_result.json"
CONFIG_NAME = "ddp_config.yaml"
LOCALHOST = "127.0.0.1"
# The torchrun environment a worker needs; its absence means "not launched by torchrun".
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedLaunchError(RuntimeError):
    """torchrun or a worker failed; the message says which command and where the logs are."""


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: global rank, world size, local rank, its device."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


# ----------------------------------------------------------------------------------------------
# process group


def resolve_backend(requested: Backend, device: torch.device) -> str:
    """NCCL for CUDA training, gloo otherwise; an explicit choice that cannot work is an error."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ValueError(
            f"backend 'nccl' needs CUDA but train.device resolves to {device.type!r}; "
            "use --backend gloo (or auto) on CPU"
        )
    if requested == "gloo" and device.type == "cuda":
        log.warning("gloo on CUDA works but is slower than NCCL")
    return requested


def worker_device(cfg: PipelineConfig, local_rank: int) -> torch.device:
    """This worker's device: its own GPU (`cuda:<local rank>`) when training on CUDA."""
    device = select_device(cfg.train.device)
    if device.type == "cuda":
        n_gpus = torch.cuda.device_count()
        if local_rank >= n_gpus:
            raise RuntimeError(
                f"local rank {local_rank} has no GPU: this node has {n_gpus}; "
                "start at most that many processes per node (--nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # so a bare "cuda" in train.py means this worker's GPU
    return device


@contextlib.contextmanager
def process_group(
    cfg: PipelineConfig, backend: Backend = "auto", timeout_minutes: float = 30.0
) -> Iterator[DistContext]:
    """Join the job described by torchrun's environment variables; leave it on exit."""
    missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"environment variable(s) {missing} are not set: start this under torchrun "
            "(`torchrun --nproc-per-node N -m alphaloom.tasks.training.distributed ...`) "
            "or `alphaloom train-ddp`"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = worker_device(cfg, local_rank)
    chosen = resolve_backend(backend, device)
    dist.init_process_group(
        chosen,
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=dt.timedelta(minutes=timeout_minutes),
        **({"device_id": device} if chosen == "nccl" else {}),
    )
    try:
        yield DistContext(rank, world, local_rank, chosen, device)
    finally:
        dist.destroy_process_group()


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that is free on `host` right now (the OS picks it; bound to `host` only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def spawn_local(
    fn: Callable[..., None], nprocs: int, args: tuple[Any, ...] = (), port: int | None = None
) -> None:
    """Run `fn(rank, *args)` in `nprocs` fresh processes with a localhost rendezvous set up.

    torch.multiprocessing.spawn with the env:// variables torchrun would set (MASTER_ADDR is
    127.0.0.1, so nothing listens beyond this machine). Tests and benchmarks use it to run
    collectives without a subprocess CLI; a failure in any rank is raised here.
    """
    import torch.multiprocessing as mp

    env = {
        "MASTER_ADDR": LOCALHOST,
        "MASTER_PORT": str(port or free_port()),
        "WORLD_SIZE": str(nprocs),
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        mp.spawn(_spawned, args=(fn, args), nprocs=nprocs, join=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _spawned(rank: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
    fn(rank, *args)


# ----------------------------------------------------------------------------------------------
# the worker (what torchrun runs)


def train_rank(
    ctx: DistContext,
    shard_dir: str,
    cfg: PipelineConfig,
    checkpoint_dir: str,
    run_id: str | None = None,
) -> TrainResult:
    """Train as one rank of a joined job; rank 0 also writes `ddp_result.json` for the launcher."""
    log.info(
        "rank %d/%d (local %d) on %s with %s",
        ctx.rank, ctx.world_size, ctx.local_rank, ctx.device, ctx.backend,
    )  # fmt: skip
    result = train_model(shard_dir, cfg, checkpoint_dir, run_id)
    if ctx.rank == 0:
        write_result(result, checkpoint_dir, ctx)
    dist.barrier()  # nobody tears the group down before rank 0 has written
    return result


def write_result(result: TrainResult, checkpoint_dir: Location, ctx: DistContext) -> FsPath:
    """What the launcher needs besides the weights: best epoch, history, where it resumed."""
    payload = {
        "best_epoch": result.best_epoch,
        "best_val_rank_ic": result.best_val_rank_ic,
        "history": result.history,
        "resumed_at": list(result.resumed_at) if result.resumed_at else None,
        "world_size": ctx.world_size,
        "backend": ctx.backend,
        "device": result.device,
    }
    path = FsPath.of(checkpoint_dir) / RESULT_NAME
    write_text_atomic(path, json.dumps(payload, indent=1))
    return path


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `python -m alphaloom.tasks.training.distributed` (what torchrun starts on
    every rank)."""
    parser = argparse.ArgumentParser(
        prog="python -m alphaloom.tasks.training.distributed",
        description="One DDP training rank; start it with torchrun.",
    )
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--shards",
        default=None,
        help="shard-set directory (default: rank 0 builds or reuses it from the config first)",
    )
    parser.add_argument("--checkpoint-dir", required=True, help="shared by all ranks")
    parser.add_argument("--run-id", default=None, help="MLflow run that rank 0 logs metrics to")
    parser.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    return parser


def build_data(cfg: PipelineConfig) -> str:
    """The shard set of a config without Prefect: each stage's intact output is reused (its
    checksums verified), a missing or broken one is built."""
    from alphaloom.tasks.dataset.chain import data_stages

    return data_stages(cfg, prefect=False).shards.path


def main(argv: Sequence[str] | None = None) -> int:
    """torchrun entry point:
    `torchrun --nproc-per-node N -m alphaloom.tasks.training.distributed --config ...`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s rank{os.environ.get('RANK', '?')} %(levelname)s %(name)s: %(message)s",
        force=True,  # importing Prefect configured logging for flows; this is a plain worker
    )
    cfg = load_config(args.config, args.overrides)
    with process_group(cfg, args.backend) as ctx:
        shard_dir = args.shards or shards_from_rank0(ctx, cfg)
        train_rank(ctx, shard_dir, cfg, args.checkpoint_dir, args.run_id)
    return 0


def shards_from_rank0(ctx: DistContext, cfg: PipelineConfig) -> str:
    """Rank 0 builds (or reuses) the data stages; the others wait for the path: one writer."""
    box = [build_data(cfg) if ctx.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


# ----------------------------------------------------------------------------------------------
# the launcher (what `alphaloom train-ddp` runs)


def torchrun_command(
    nproc_per_node: int,
    worker_args: Sequence[str],
    port: int,
    max_restarts: int = 0,
) -> list[str]:
    """`python -m torch.distributed.run ...` for one node, rendezvous on 127.0.0.1:`port`."""
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={nproc_per_node}",
        f"--master-addr={LOCALHOST}",
        f"--master-port={port}",
        f"--max-restarts={max_restarts}",
        "-m",
        "alphaloom.tasks.training.distributed",
        *worker_args,
    ]


def launch_training(
    shard_dir: str,
    cfg: PipelineConfig,
    checkpoint_dir: str,
    run_id: str | None = None,
    *,
    nproc_per_node: int = 2,
    backend: Backend = "auto",
    max_restarts: int = 0,
) -> TrainResult:
    """Train with torchrun on this machine and return rank 0's best model, loaded here.

    The resolved config is written next to the checkpoint so every rank trains on exactly the
    same settings. A worker crash fails the launch (after `max_restarts` elastic restarts, each
    of which resumes from the checkpoint); a retried launch resumes the same way.
    """
    ckpt = FsPath.of(checkpoint_dir)
    if ckpt.local is not None:
        ckpt.local.mkdir(parents=True, exist_ok=True)
    config_path = ckpt / CONFIG_NAME
    write_text_atomic(config_path, cfg.to_yaml())
    (ckpt / RESULT_NAME).remove()
    worker_args = [
        "--config", str(config_path),
        "--shards", str(shard_dir),
        "--checkpoint-dir", str(ckpt),
        "--backend", backend,
        *(["--run-id", run_id] if run_id else []),
    ]  # fmt: skip
    command = torchrun_command(nproc_per_node, worker_args, free_port(), max_restarts)
    log.info("launching: %s", " ".join(command))
    completed = subprocess.run(command, check=False)  # same interpreter: same alphaloom
    if completed.returncode != 0:
        raise DistributedLaunchError(
            f"torchrun exited with status {completed.returncode}: {' '.join(command)} "
            "(each rank's traceback is printed above)"
        )
    return load_result(shard_dir, cfg, ckpt)


def load_result(shard_dir: str, cfg: PipelineConfig, checkpoint_dir: Location) -> TrainResult:
    """Rebuild the TrainResult of a finished DDP job from rank 0's files (weights_only loads)."""
    from alphaloom.model.shard_set import ShardSetInfo

    ckpt = FsPath.of(checkpoint_dir)
    result_path = ckpt / RESULT_NAME
    if not result_path.is_file():
        raise DistributedLaunchError(f"{result_path} is missing: rank 0 did not finish")
    meta = json.loads(result_path.read_text())
    info = ShardSetInfo.open(shard_dir)
    model = build_model(info, cfg)
    best_path = ckpt / BEST_STATE_NAME
    model.load_state_dict(load_weights(best_path))
    model.eval()
    resumed = meta.get("resumed_at")
    return TrainResult(
        model=model,
        best_epoch=int(meta["best_epoch"]),
        best_val_rank_ic=float(meta["best_val_rank_ic"]),
        history=list(meta["history"]),
        model_state_path=str(best_path),
        dims=model_dims(info),
        feature_names=list(info.feature_names),
        device="cpu",
        resumed_at=(int(resumed[0]), int(resumed[1])) if resumed else None,
    )


train_ddp_task = task(
    name="train-model-ddp",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,  # IO/network/timeouts only: a data error fails at once
    timeout_seconds=12 * 3600,
    cache_policy=NO_CACHE,  # side effects (MLflow metrics); the checkpoint is the cache
    persist_result=False,  # the result holds a live nn.Module
)(launch_training)  # Prefect task: torchrun on this machine; a retry resumes from the checkpoint


if __name__ == "__main__":
    sys.exit(main())
