"""The shared run plumbing: the precision rule, shards, decisions and errors shared across ranks,
run-folder provenance."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from torch.utils.data import DistributedSampler

from codes.common.distributed import (
    DistributedContext,
    PeerRankError,
    broadcast_from_main,
    raise_if_any_rank_failed,
    run_on_main,
    shard_indices,
)
from codes.common.machine import autocast_dtype
from codes.common.runs import prepare_run_dir

CPU = DistributedContext(device=torch.device("cpu"))


def test_the_precision_rule_against_hand_written_cases():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("auto", cuda) == torch.bfloat16
    assert autocast_dtype("bf16", cpu) == torch.bfloat16 and autocast_dtype("bf16", cuda) == torch.bfloat16
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("fp32", cuda) is None
    with pytest.raises(ValueError, match=r"machine\.precision"):
        autocast_dtype("fp16", cpu)


@pytest.mark.parametrize(("n", "world_size"), [(10, 2), (11, 2), (7, 3), (2, 4), (54, 2)])
def test_shards_are_padded_like_distributed_sampler(n, world_size):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shards = [
        shard_indices(order, DistributedContext(torch.device("cpu"), rank, world_size))
        for rank in range(world_size)
    ]
    sampler = [
        list(DistributedSampler(range(n), world_size, rank, shuffle=False)) for rank in range(world_size)
    ]  # the same rule over positions
    for rank in range(world_size):
        assert shards[rank].tolist() == [int(order[i]) for i in sampler[rank]]
    assert len({len(s) for s in shards}) == 1  # every rank the same number of batches
    assert set(torch.cat(shards).tolist()) == set(range(n))


def test_without_distribution_the_helpers_are_plain_calls():
    order = torch.arange(5)
    assert shard_indices(order, CPU) is order
    assert broadcast_from_main({"a": 1}, CPU) == {"a": 1}
    assert run_on_main(lambda: 42, CPU) == 42
    raise_if_any_rank_failed(None, CPU)
    with pytest.raises(KeyError):
        raise_if_any_rank_failed(KeyError("x"), CPU)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_ranks(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    context = DistributedContext(torch.device("cpu"), rank, 2)
    outcome = {"decided": broadcast_from_main(f"rank {rank} decided", context)}

    def fails_on_main() -> None:
        raise FileExistsError("the run folder is taken")

    try:
        run_on_main(fails_on_main, context)
    except Exception as error:
        outcome["run_on_main"] = type(error).__name__ + ": " + str(error)
    try:  # only rank 1 fails; rank 0 must learn it instead of waiting at the next collective
        raise_if_any_rank_failed(FloatingPointError("nan") if rank == 1 else None, context)
    except Exception as error:
        outcome["any_rank"] = type(error).__name__ + ": " + str(error)
    results[rank] = outcome
    dist.destroy_process_group()


def test_decisions_and_errors_are_shared_between_two_gloo_ranks():
    results = mp.Manager().dict()
    mp.spawn(_two_ranks, args=(_free_port(), results), nprocs=2, join=True)
    assert results[0]["decided"] == results[1]["decided"] == "rank 0 decided"
    assert results[0]["run_on_main"] == "FileExistsError: the run folder is taken"
    assert (
        results[1]["run_on_main"]
        == f"{PeerRankError.__name__}: rank 0 failed: FileExistsError: the run folder is taken"
    )
    assert results[1]["any_rank"] == "FloatingPointError: nan"
    assert results[0]["any_rank"] == f"{PeerRankError.__name__}: rank 1 failed: FloatingPointError: nan"


def test_a_run_folder_records_its_config_overrides_commit_and_packages(tmp_path):
    cfg = OmegaConf.create(
        {
            "exp_name": "expX",
            "run_name": "r1",
            "paths": {"output_dir": str(tmp_path)},
            "trainer": {"resume": False},
        }
    )
    run_dir = prepare_run_dir(cfg, CPU, ["trainer.epochs=3", "data.folds=[0,1]"])
    assert run_dir == tmp_path / "expX" / "r1"
    assert OmegaConf.load(run_dir / "config.yaml") == cfg
    assert (run_dir / "overrides.txt").read_text() == "trainer.epochs=3\ndata.folds=[0,1]\n"
    assert (run_dir / "git_commit.txt").read_text().strip()
    packages = (run_dir / "packages.txt").read_text().splitlines()
    assert f"torch=={torch.__version__}" in packages and all("==" in line for line in packages)
    assert not list(run_dir.glob(".*.tmp"))  # atomic writes leave no temporary file
    with pytest.raises(FileExistsError, match=r"trainer\.resume=true"):
        prepare_run_dir(cfg, CPU, [])
    cfg.trainer.resume = True
    prepare_run_dir(cfg, CPU, ["trainer.resume=true"])
    assert (run_dir / "overrides.txt").read_text().startswith("trainer.epochs=3")  # the first command is kept
    assert [p.read_text() for p in run_dir.glob("overrides.resume-*.txt")] == ["trainer.resume=true\n"]
    cfg.run_name = "never-started"
    with pytest.raises(FileNotFoundError, match="holds no run"):
        prepare_run_dir(cfg, CPU, [])
