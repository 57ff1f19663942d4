"""What belongs to the machine, not to an experiment: paths, device, precision, threads.

Every experiment's ``Config`` (and NoiseBERT's) holds these two sections; their values come from
the shared groups in ``configs/`` (``paths``, ``machine``), so a run's numbers never depend on
which experiment folder defines them. An experiment's own hyper-parameters stay in its
``config.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class PathsConfig:
    """Relative paths are taken from the repository root."""

    data_dir: str = "data"  # the competition files, when present
    synthetic_dir: str = "data/synthetic"  # the synthetic stand-in, generated on first use
    output_dir: str = "outputs"  # runs go to <output_dir>/<exp>/<run>/


@dataclass
class MachineConfig:
    """``configs/machine/{auto,cpu,gpu}.yaml`` set these; ``machine.<key>=...`` on the command line."""

    device: str = "auto"  # auto (CUDA when available) | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the trained model
    # torch.compile's mode: default | reduce-overhead (CUDA graphs: every batch the same shape) | max-autotune
    compile_mode: str = "default"
    num_workers: int = 4  # DataLoader workers, where a DataLoader is used
    num_threads: int | None = None  # torch CPU threads; None = torch's default (1 on a busy shared CPU)
    # the CPU fast paths of codes/models/cpu_fast_paths/ (same results, faster training on a CPU)
    cpu_fast_paths: bool = True
    distributed_timeout_s: int = 1800  # torchrun: a rank that waits longer than this fails


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The one precision rule of training, evaluation and inference.

    ``bf16`` -> bf16 autocast; ``auto`` -> bf16 autocast on CUDA, none (fp32) elsewhere;
    ``fp32`` -> none.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"machine.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; disabled when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def apply_num_threads(num_threads: int | None) -> None:
    """``torch.set_num_threads`` when a number is given (``machine.num_threads``)."""
    if num_threads:
        torch.set_num_threads(int(num_threads))
