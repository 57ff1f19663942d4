"""The shared run plumbing: the precision rule, shards, decisions and errors shared across ranks,
run-folder provenance."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

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
from codes.common.runs import (
    FILE_MODE,
    PROVENANCE_FILES,
    ResumeMismatchError,
    RunFolderInUse,
    check_run_name,
    open_run_dir,
)

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


def run_config(tmp_path, **trainer):
    return OmegaConf.create(
        {
            "exp_name": "expX",
            "run_name": "r1",
            "paths": {"output_dir": str(tmp_path)},
            "model": {"d_model": 64},
            "machine": {"device": "cpu", "num_threads": None},
            "trainer": {"resume": False, "lr": 1e-3, **trainer},
        }
    )


def open_and_close(cfg, overrides=()):
    with open_run_dir(cfg, CPU, list(overrides)) as run_dir:
        return run_dir


def test_a_run_folder_records_its_config_overrides_commit_and_packages(tmp_path):
    cfg = run_config(tmp_path)
    with open_run_dir(cfg, CPU, ["trainer.epochs=3", "data.folds=[0,1]"]) as run_dir:
        assert run_dir == tmp_path / "expX" / "r1"
        (run_dir / "fold0").mkdir()
        (run_dir / "fold0" / "last.pt").write_bytes(b"a checkpoint")
    assert OmegaConf.load(run_dir / "config.yaml") == cfg
    assert (run_dir / "overrides.txt").read_text() == "trainer.epochs=3\ndata.folds=[0,1]\n"
    assert (run_dir / "git_commit.txt").read_text().strip()
    packages = (run_dir / "packages.txt").read_text().splitlines()
    assert f"torch=={torch.__version__}" in packages and all("==" in line for line in packages)
    assert not list(run_dir.glob(".*.tmp"))  # atomic writes leave no temporary file
    for name in PROVENANCE_FILES:  # the mode open() gives (readable by the group), not mkstemp's 0600
        assert (run_dir / name).stat().st_mode & 0o777 == FILE_MODE, name
    with pytest.raises(FileExistsError, match=r"trainer\.resume=true"):
        open_and_close(cfg)
    cfg.trainer.resume = True
    open_and_close(cfg, ["trainer.resume=true", "machine.device=cuda"])
    assert (run_dir / "overrides.txt").read_text().startswith("trainer.epochs=3")  # the first command is kept
    assert OmegaConf.load(run_dir / "config.yaml").trainer.resume is False  # and its config
    [resumed] = [p.read_text() for p in run_dir.glob("overrides.resume-*.txt")]
    assert resumed.startswith("# resumed with git commit ") and resumed.endswith(
        "trainer.resume=true\nmachine.device=cuda\n"
    )
    cfg.run_name = "never-started"
    with pytest.raises(FileNotFoundError, match="holds no run"):
        open_and_close(cfg)


def test_resuming_with_other_settings_is_refused_listing_them_before_anything_is_written(tmp_path):
    cfg = run_config(tmp_path)
    run_dir = open_and_close(cfg)
    saved = (run_dir / "config.yaml").read_text()
    changed = run_config(tmp_path, resume=True, lr=0.5)
    changed.model.d_model = 32
    changed.machine.num_threads = 1  # a machine setting may change
    with pytest.raises(ResumeMismatchError) as error:
        open_and_close(changed)
    assert "model.d_model: 64 -> 32" in str(error.value) and "trainer.lr: 0.001 -> 0.5" in str(error.value)
    assert "num_threads" not in str(error.value).split(". Resume")[0]
    assert (run_dir / "config.yaml").read_text() == saved
    (run_dir / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match="finished run"):
        open_and_close(run_config(tmp_path, resume=True))


def test_a_folder_whose_first_attempt_failed_before_any_checkpoint_can_be_reused(tmp_path):
    cfg = run_config(tmp_path)
    with pytest.raises(RuntimeError, match="bad model setting"), open_run_dir(cfg, CPU, []):
        raise RuntimeError("bad model setting")  # e.g. a ModelConfigError while building the model
    cfg.model.d_model = 32  # the user fixes the setting and runs the same command again
    run_dir = open_and_close(cfg)
    assert OmegaConf.load(run_dir / "config.yaml").model.d_model == 32


@pytest.mark.parametrize("run_name", ["../../x", "/tmp/elsewhere", "a/b", "..", ".hidden", ""])
def test_run_name_must_be_one_plain_folder_name(tmp_path, run_name):
    if not run_name:
        assert check_run_name("20261130-120000") == "20261130-120000"
        return
    cfg = run_config(tmp_path)
    cfg.run_name = run_name
    with pytest.raises(ValueError, match="single folder name"):
        open_and_close(cfg)
    assert not any(tmp_path.iterdir())


def test_a_second_process_cannot_write_to_a_run_folder_in_use(tmp_path):
    cfg = run_config(tmp_path)
    script = (
        "import sys, time\n"
        "from filelock import FileLock\n"
        "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(60)\n"
    )
    (tmp_path / "expX" / "r1").mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "expX" / "r1" / ".lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderInUse, match="another process is writing"):
            open_and_close(cfg)
        assert not (tmp_path / "expX" / "r1" / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    open_and_close(cfg)  # free again once the other process is gone
