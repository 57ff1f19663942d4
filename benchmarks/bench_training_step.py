"""Training throughput of an experiment's model: forward + backward + AdamW step, sequences/s.

    python benchmarks/bench_training_step.py --exp exp013 [--batch-size 32 --length 128 --features 16]
        [--min-length 29] [--steps 10 --repeats 3] [--device cpu|cuda] [--bf16] [--compile]
        [--no-time-reduction] [--no-cpu-fast-paths] [model.key=value ...]

The model is built from the experiment's default ``ModelConfig`` (the full dims); trailing
``model.key=value`` arguments override fields. Lengths are random in [min-length, length] with
the mask set accordingly (``--min-length`` equal to ``--length``: no padding at all); the loss is
the experiment's training loss. After the warm-up, ``--repeats`` rounds of ``--steps`` steps are
timed; each round's throughput and their median are printed. On CPU the model gets the CPU fast
paths (``codes.models.cpu_fast_paths.enable_cpu_fast_paths``) as training on CPU does;
``--no-cpu-fast-paths`` measures the plain model.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import statistics
import time

import torch
from omegaconf import OmegaConf

from codes.models.cpu_fast_paths import enable_cpu_fast_paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exp", default="exp013")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-length", type=int, default=29)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="torch.autocast with bfloat16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--no-time-reduction", action="store_true")
    parser.add_argument(
        "--no-cpu-fast-paths", action="store_true", help="the plain model on CPU (no enable_cpu_fast_paths)"
    )
    parser.add_argument("overrides", nargs="*", help="model.key=value")
    args = parser.parse_args()

    config = importlib.import_module(f"codes.exp.{args.exp}.config")
    model_module = importlib.import_module(f"codes.exp.{args.exp}.model")
    train_module = importlib.import_module(f"codes.exp.{args.exp}.train")
    cfg = OmegaConf.structured(config.Config())
    cfg.merge_with_dotlist(list(args.overrides))
    if args.no_time_reduction:
        cfg.model.time_reduction = False
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = model_module.GestureClassifier(args.features, cfg.model, args.length)
    fast_paths = device.type == "cpu" and not args.no_cpu_fast_paths
    if fast_paths:
        enable_cpu_fast_paths(model)
    model = model.to(device)
    n_parameters = sum(p.numel() for p in model.parameters())
    step_model = torch.compile(model) if args.compile else model
    if hasattr(train_module, "build_optimizer"):  # the experiment's own optimizer settings
        optimizer = train_module.build_optimizer(model, cfg.trainer)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(args.batch_size, args.length, args.features, generator=generator)
    if not 1 <= args.min_length <= args.length:
        parser.error(f"--min-length must be in [1, --length={args.length}], got {args.min_length}")
    lengths = torch.randint(args.min_length, args.length + 1, (args.batch_size,), generator=generator)
    mask = torch.arange(args.length)[None, :] < lengths[:, None]
    features = (features * mask[..., None]).to(device)
    mask = mask.to(device)
    demographics = (
        torch.tensor([[1.0, 30.0, 0.0, 1.0, 170.0, 55.0, 30.0]]).repeat(args.batch_size, 1).to(device)
    )
    labels = torch.randint(0, 18, (args.batch_size,), generator=generator).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            outputs = step_model(features, mask, demographics)
        loss = train_module.compute_loss(outputs, labels, cfg.trainer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    for _ in range(args.warmup):
        step()
    rounds = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rounds.append(time.perf_counter() - started)
    seconds = statistics.median(rounds)
    throughput = args.steps * args.batch_size / seconds
    per_round = ", ".join(f"{args.steps * args.batch_size / r:.1f}" for r in rounds)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"{args.exp} | {name} | time_reduction={cfg.model.time_reduction} bf16={args.bf16} compile={args.compile} "
        f"cpu_fast_paths={fast_paths} "
        f"{' '.join(args.overrides)} | "
        f"params {n_parameters / 1e6:.2f} M | batch {args.batch_size} x length {args.length} "
        f"(real {args.min_length}-{args.length}) | rounds {per_round} | "
        f"median {throughput:.1f} sequences/s ({seconds / args.steps * 1000:.0f} ms/step)"
    )


if __name__ == "__main__":
    main()
