"""The per-step EMA update and the per-epoch ``last.pt`` write, timed on their own.

    python benchmarks/bench_ema_checkpoint.py --exp exp018 [--variant quick] [--updates 200 --rounds 5]
        [--saves 5] [--out-dir /tmp/ckpt] [model.key=value ...]

EMA: ``update_parameters`` of ``torch.optim.swa_utils.AveragedModel`` with
``get_ema_multi_avg_fn_with_warmup`` (what ``codes.common.training.build_ema`` builds) against
``codes.common.ema.WarmupEMA`` (no host synchronisation), on the experiment's model; ``--rounds``
rounds of ``--updates`` updates each, alternating, the median round per update is printed.

Checkpoint: what ``FoldCheckpoints.save`` writes to ``last.pt`` (model and EMA state dicts, AdamW
state after one step, scheduler, fold state) through ``save_atomically`` (``torch.save``, flush,
``fsync``, rename), ``--saves`` times into a temporary folder under ``--out-dir`` (``outputs``,
where runs write); the median write and the file size are
printed, with the mean write time per epoch for ``trainer.checkpoint_every_epochs`` 1, 2 and 5.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.optim.swa_utils import AveragedModel

from codes.common.checkpoint import save_atomically
from codes.common.ema import WarmupEMA, get_ema_multi_avg_fn_with_warmup


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exp", default="exp018")
    parser.add_argument("--variant", default=None)
    parser.add_argument("--features", type=int, default=44)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--out-dir", default="outputs", help="a temporary folder for last.pt is made here")
    parser.add_argument("overrides", nargs="*", help="model.key=value")
    args = parser.parse_args()

    config = importlib.import_module(f"codes.exp.{args.exp}.config")
    model_module = importlib.import_module(f"codes.exp.{args.exp}.model")
    cfg = OmegaConf.structured(config.Config())
    if args.variant is not None:
        cfg.model = OmegaConf.merge(cfg.model, config.VARIANTS[args.variant].get("model", {}))
    cfg.merge_with_dotlist(list(args.overrides))
    torch.manual_seed(0)
    model = model_module.GestureClassifier(args.features, cfg.model, args.max_len)
    n_parameters = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters())) + len(list(model.buffers()))
    decay = cfg.trainer.ema_decay
    emas = {
        "AveragedModel + get_ema_multi_avg_fn_with_warmup": AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn_with_warmup(decay), use_buffers=True
        ),
        "WarmupEMA": WarmupEMA(model, decay),
    }
    times: dict[str, list[float]] = {name: [] for name in emas}
    for ema in emas.values():
        ema.update_parameters(model)  # the first update copies
    for _ in range(args.rounds):
        for name, ema in emas.items():
            started = time.perf_counter()
            for _ in range(args.updates):
                ema.update_parameters(model)
            times[name].append((time.perf_counter() - started) / args.updates)
    print(
        f"{args.exp} variant={args.variant} {' '.join(args.overrides)}: {n_parameters / 1e6:.2f} M parameters, "
        f"{n_tensors} tensors, {torch.get_num_threads()} torch thread(s)"
    )
    for name, per_update in times.items():
        rounds = ", ".join(f"{t * 1e3:.3f}" for t in per_update)
        print(f"EMA update, {name}: rounds {rounds} ms, median {statistics.median(per_update) * 1e3:.3f} ms")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's state (two moments per parameter) as after any step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = emas["WarmupEMA"]
    checkpoint = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": {"epoch": 1, "history": []},
    }
    with tempfile.TemporaryDirectory(dir=args.out_dir) as folder:
        path = Path(folder) / "last.pt"
        writes = []
        for _ in range(args.saves):
            started = time.perf_counter()
            save_atomically(checkpoint, path)
            writes.append(time.perf_counter() - started)
        size = path.stat().st_size
    write = statistics.median(writes)
    rounds = ", ".join(f"{t:.3f}" for t in writes)
    print(f"last.pt: {size / 1e6:.1f} MB, writes {rounds} s, median {write:.3f} s")
    for every in (1, 2, 5):
        print(f"  checkpoint_every_epochs={every}: {write / every:.3f} s of writing per epoch")


if __name__ == "__main__":
    main()
