"""CPU training throughput of the Squeezeformer encoder, with and without the temporal U-Net.

    python benchmarks/bench_encoder.py [--steps 20] [--warmup 3] [--batch-size 32] [--length 128]

One training step = forward + backward + AdamW step of a classifier at the reference dims:
16 input features -> Linear -> ``SqueezeformerEncoder`` (d_model 256, 8 blocks, 8 heads, FF 1024,
conv kernel 31) -> masked mean pooling -> Linear to 19 gestures, on batches of 32 sequences
padded to 128 steps whose real lengths are drawn uniformly from 29..128. Batches are generated
before timing. The model gets the CPU fast paths (``enable_cpu_fast_paths``), as training on
CPU does. With ``--repeats N`` the variants are measured in N alternating rounds and the
table gives the median and the best round (the CPU may be shared; the load average is printed).
Prints a markdown table with the command and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time

import torch
from torch import nn

from codes.models.cpu_fast_paths import enable_cpu_fast_paths
from codes.models.masking import lengths_to_mask, masked_mean
from codes.models.squeezeformer import SqueezeformerEncoder


class Classifier(nn.Module):
    """Input projection, encoder, masked mean pooling and a linear head."""

    def __init__(self, args: argparse.Namespace, time_reduction: bool) -> None:
        super().__init__()
        self.projection = nn.Linear(args.features, args.d_model)
        self.encoder = SqueezeformerEncoder(
            d_model=args.d_model,
            num_blocks=args.blocks,
            num_heads=args.heads,
            ff_dim=args.ff_dim,
            conv_kernel=args.kernel,
            dropout=args.dropout,
            attention_dropout=args.dropout,
            time_reduction=time_reduction,
            max_len=args.length,
            gradient_checkpointing=args.gradient_checkpointing,
        )
        self.head = nn.Linear(args.d_model, args.classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, T, F), (B, T) -> (B, classes)``."""
        hidden, mask = self.encoder(self.projection(x), mask)  # (B, T, F) -> (B, T, D)
        return self.head(masked_mean(hidden, mask))  # (B, T, D) -> (B, D) -> (B, classes)


def make_batches(
    args: argparse.Namespace, count: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(count):
        lengths = torch.randint(args.min_length, args.length + 1, (args.batch_size,), generator=generator)
        x = torch.randn(args.batch_size, args.length, args.features, generator=generator)
        labels = torch.randint(0, args.classes, (args.batch_size,), generator=generator)
        batches.append((x, lengths_to_mask(lengths, args.length), labels))
    return batches


def measure(args: argparse.Namespace, time_reduction: bool) -> dict[str, float]:
    """Train for ``warmup`` untimed then ``steps`` timed steps; return throughput figures."""
    torch.manual_seed(args.seed)
    model = enable_cpu_fast_paths(Classifier(args, time_reduction)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batches = make_batches(args, args.warmup + args.steps)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)

    def step(x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = model(x, mask)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    for batch in batches[: args.warmup]:
        step(*batch)
    started = time.perf_counter()
    for batch in batches[args.warmup :]:
        loss = step(*batch)
    elapsed = time.perf_counter() - started
    assert torch.isfinite(loss), "training diverged"
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "sequences_per_s": args.steps * args.batch_size / elapsed,
        "ms_per_step": 1000 * elapsed / args.steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128, help="padded length of every batch")
    parser.add_argument("--min-length", type=int, default=29, help="shortest real length")
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ff-dim", type=int, default=1024)
    parser.add_argument("--kernel", type=int, default=31)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--no-time-reduction", action="store_true", help="measure only without the U-Net")
    parser.add_argument("--only-time-reduction", action="store_true", help="measure only with the U-Net")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating measurement rounds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 1 <= args.min_length <= args.length:
        parser.error(f"--min-length must be in [1, --length={args.length}], got {args.min_length}")
    if args.no_time_reduction and args.only_time_reduction:
        parser.error("--no-time-reduction and --only-time-reduction exclude each other")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    variants = [True, False]
    if args.no_time_reduction:
        variants = [False]
    elif args.only_time_reduction:
        variants = [True]
    load_before = os.getloadavg()[0]
    results: dict[bool, list[dict[str, float]]] = {variant: [] for variant in variants}
    for _ in range(args.repeats):
        for variant in variants:
            results[variant].append(measure(args, variant))
    load_after = os.getloadavg()[0]

    command = shlex.join(["python", "benchmarks/bench_encoder.py", *sys.argv[1:]])
    print(f"`{command}`\n")
    print(
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"torch.get_num_threads() = {torch.get_num_threads()}, "
        f"1-min load average {load_before:.1f} before / {load_after:.1f} after\n"
    )
    print(
        f"d_model {args.d_model}, {args.blocks} blocks, {args.heads} heads, FF {args.ff_dim}, "
        f"kernel {args.kernel}, batch {args.batch_size} x length {args.length} "
        f"(real {args.min_length}..{args.length}), {args.warmup} warm-up + {args.steps} timed steps "
        f"x {args.repeats} round(s), fused AdamW"
        f"{', bf16 autocast' if args.bf16 else ''}\n"
    )
    print(
        "| time reduction | parameters (M) | sequences/s (median) | sequences/s (best) | ms/step (median) |"
    )
    print("|---|---:|---:|---:|---:|")
    for variant, rounds in results.items():
        throughput = [r["sequences_per_s"] for r in rounds]
        print(
            f"| {'on' if variant else 'off'} | {rounds[0]['params_m']:.2f} | "
            f"{statistics.median(throughput):.1f} | {max(throughput):.1f} | "
            f"{statistics.median(r['ms_per_step'] for r in rounds):.0f} |"
        )


if __name__ == "__main__":
    main()
