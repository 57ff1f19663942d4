"""Training throughput of an experiment's model: forward + backward + AdamW step, sequences/s.

    python benchmarks/bench_training_step.py --exp exp013 [--batch-size 32 --length 128 --features 16]
        [--max-len N] [--variant quick] [--lengths-from data/synthetic]
        [--min-length 29] [--steps 10 --repeats 3] [--device cpu|cuda] [--bf16] [--compile]
        [--full-step] [--ema torch|sync-free] [--profile] [--no-time-reduction] [--batch-from DIR]
        [--no-cpu-fast-paths] [--length-mix competition --batches 16 --batching padded|cut|grouped]
        [model.key=value ...]

The model is built from the experiment's default ``ModelConfig`` (the full dims), or with
``--variant NAME`` from that variant's ``model`` values (e.g. ``quick``); trailing
``model.key=value`` arguments override fields. ``--max-len`` is the model's ``data.max_len``
(positional tables, BERT positions; default ``--length``); batches are padded to ``--length``,
as training pads every batch to ``data.max_len``.

``--length-mix competition`` draws real lengths like the competition's (log-normal with its
median 59 and mean 70.5 rows, within 29-700, cropped to ``--length``). ``--batches N`` makes N
batches taken in turn, and ``--batching`` shapes them as training would with length-aware
batches (``codes/common/batching.py``): ``padded`` (every batch ``--length`` steps), ``cut``
(each cut to its longest sequence) or ``grouped`` (the N batches grouped by length as one
mega-batch, as ``data.group_by_length`` does, then cut); the speed-up of a setting is its
sequences/s over ``padded``'s on the same draw.

Real lengths are random in [min-length, length] with the mask set accordingly (``--min-length``
equal to ``--length``: no padding at all), or, with ``--lengths-from DIR``, drawn from the
training sequences of a dataset folder in the competition format (cropped to ``--length``), so
that the padding is what training sees. ``--batch-from DIR`` takes a whole batch from that dataset
instead: ``--batch-size`` random training sequences with the experiment's own feature settings
(``data.*``: e.g. exp021's ToF grid), normalised, their last ``--length`` steps, and the
thermopile and ToF inputs of every second sequence zeroed (``data.sensor_drop_prob`` = 0.5, as
training drops them); the model is then built by the experiment's ``build_model``. The loss is
the experiment's training loss.
``--full-step`` adds what ``train.py`` does besides: gradient clipping (``trainer.grad_clip``)
and the EMA update (``--ema torch``: ``torch.optim.swa_utils.AveragedModel`` as
``codes.common.training.build_ema`` builds it; ``--ema sync-free``:
``codes.common.ema.WarmupEMA``).

After the warm-up, ``--repeats`` rounds of ``--steps`` steps are timed; each round's throughput
and their median are printed. ``--profile`` then runs ``--steps`` more steps under
``torch.profiler`` and prints the ops by self time, grouped by input shape. On CPU the model gets
the CPU fast paths (``codes.models.cpu_fast_paths.enable_cpu_fast_paths``) as training on CPU
does; ``--no-cpu-fast-paths`` measures the plain model.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from codes.models.cpu_fast_paths import enable_cpu_fast_paths

# the competition's sequence lengths (docs: min 29, median 59, mean 70.5, max 700 rows): a
# log-normal with that median and mean, cut to [29, 700]
COMPETITION_LENGTHS = {"median": 59.0, "mean": 70.5, "min": 29, "max": 700}


def competition_like_lengths(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n,)`` lengths drawn like the competition's: log-normal, median 59 and mean 70.5, in [29, 700]."""
    mu = np.log(COMPETITION_LENGTHS["median"])
    sigma = np.sqrt(2 * np.log(COMPETITION_LENGTHS["mean"] / COMPETITION_LENGTHS["median"]))
    draws = torch.exp(mu + sigma * torch.randn(n, generator=generator, dtype=torch.float64))
    return draws.round().clamp(COMPETITION_LENGTHS["min"], COMPETITION_LENGTHS["max"]).long()


def real_lengths(args: argparse.Namespace, generator: torch.Generator, n: int | None = None) -> torch.Tensor:
    """``(n,)`` real lengths (``n``: ``--batch-size``): uniform in [min-length, length], from
    ``--lengths-from``, or with ``--length-mix competition`` like the competition's, cropped to
    ``--length``."""
    n = n or args.batch_size
    if args.length_mix == "competition":
        return competition_like_lengths(n, generator).clamp(max=args.length)
    if args.lengths_from is None:
        return torch.randint(args.min_length, args.length + 1, (n,), generator=generator)
    from codes.common.features import FeatureSettings
    from codes.common.sequences import load_sequence_table

    lengths = load_sequence_table(args.lengths_from, "train", FeatureSettings()).lengths
    picked = torch.randint(0, len(lengths), (n,), generator=generator).numpy()
    return torch.from_numpy(np.minimum(lengths[picked], args.length).astype(np.int64))


def step_batches(
    args: argparse.Namespace, generator: torch.Generator
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """``--batches`` (features, mask) batches of random features and their real lengths, padded
    to ``--length`` or cut as ``--batching`` says (``codes/common/batching.py``)."""
    from codes.common.batching import BatchCut, length_grouped_order

    n = args.batches * args.batch_size
    features = torch.randn(n, args.length, args.features, generator=generator)  # drawn first, as before
    lengths = real_lengths(args, generator, n)
    order = torch.arange(n)
    if args.batching == "grouped":  # one mega-batch of every batch, as data.group_by_length does
        order = length_grouped_order(lengths, args.batch_size, args.batches, generator)
    mask = torch.arange(args.length)[None, :] < lengths[:, None]
    cut = BatchCut(args.length)
    batches = []
    for batch in order.split(args.batch_size):
        items = (features[batch], mask[batch])
        batches.append(items if args.batching == "padded" else cut.cut_by_mask(items, (0, 1)))
    return batches, lengths


def batch_from(
    args: argparse.Namespace, cfg, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (B, L, F), mask (B, L))``: ``--batch-size`` random training sequences of
    ``--batch-from`` with the experiment's feature settings, normalised and padded to
    ``--length``; every second sequence without its thermopile and ToF inputs."""
    from codes.common.sequences import FeatureNormalizer, load_sequence_table, pad_sequences

    settings = importlib.import_module(f"codes.exp.{args.exp}.dataset").feature_settings(cfg.data)
    table = load_sequence_table(Path(args.batch_from), "train", settings)
    picked = torch.randint(0, table.n_sequences, (args.batch_size,), generator=generator).numpy()
    batch = table.subset(picked)
    padded = pad_sequences(batch, args.length, FeatureNormalizer().fit(table).transform(batch))
    features = torch.from_numpy(padded.features)
    non_imu = table.feature_groups.get("thm", []) + table.feature_groups.get("tof", [])
    features[1::2, :, non_imu] = 0.0
    return features, torch.from_numpy(padded.mask)


def build_ema(kind: str, model: torch.nn.Module, decay: float):
    if kind == "torch":
        from torch.optim.swa_utils import AveragedModel

        from codes.common.ema import get_ema_multi_avg_fn_with_warmup

        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn_with_warmup(decay), use_buffers=True)
    from codes.common.ema import WarmupEMA

    return WarmupEMA(model, decay)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exp", default="exp013")
    parser.add_argument("--variant", default=None, help="the experiment's VARIANTS[NAME]['model'] values")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128, help="padded length of every batch")
    parser.add_argument(
        "--max-len", type=int, default=None, help="the model's data.max_len (default --length)"
    )
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-length", type=int, default=29)
    parser.add_argument(
        "--lengths-from", default=None, help="draw real lengths from this dataset's train.csv"
    )
    parser.add_argument(
        "--batch-from",
        default=None,
        help="a real batch of this dataset's train.csv, the experiment's features",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--bf16", action="store_true", help="torch.autocast with bfloat16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode")
    parser.add_argument("--full-step", action="store_true", help="+ gradient clipping and the EMA update")
    parser.add_argument("--ema", choices=("torch", "sync-free"), default="torch")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table afterwards")
    parser.add_argument("--profile-rows", type=int, default=30)
    parser.add_argument("--no-time-reduction", action="store_true")
    parser.add_argument(
        "--no-cpu-fast-paths", action="store_true", help="the plain model on CPU (no enable_cpu_fast_paths)"
    )
    parser.add_argument(
        "--length-mix", choices=("uniform", "competition"), default="uniform",
        help="competition: real lengths like the competition's (29-700, median 59), cropped to --length",
    )  # fmt: skip
    parser.add_argument(
        "--batching", choices=("padded", "cut", "grouped"), default="padded",
        help="padded: every batch --length steps; cut: each of --batches batches cut to its longest "
        "sequence; grouped: the --batches batches grouped by length (one mega-batch), then cut",
    )  # fmt: skip
    parser.add_argument("--batches", type=int, default=1, help="distinct batches, taken in turn")
    parser.add_argument("overrides", nargs="*", help="model.key=value")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    max_len = args.max_len or args.length
    if max_len < args.length:
        parser.error(f"--max-len ({max_len}) must be >= --length ({args.length})")

    config = importlib.import_module(f"codes.exp.{args.exp}.config")
    model_module = importlib.import_module(f"codes.exp.{args.exp}.model")
    train_module = importlib.import_module(f"codes.exp.{args.exp}.train")
    cfg = OmegaConf.structured(config.Config())
    if args.variant is not None:
        cfg.model = OmegaConf.merge(cfg.model, config.VARIANTS[args.variant].get("model", {}))
        cfg.trainer = OmegaConf.merge(cfg.trainer, config.VARIANTS[args.variant].get("trainer", {}))
    cfg.merge_with_dotlist(list(args.overrides))
    if args.no_time_reduction:
        cfg.model.time_reduction = False
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    real_batch = None
    if args.batch_from is not None:
        cfg.data.max_len = max_len
        real_batch = batch_from(args, cfg, generator)
        args.features = real_batch[0].shape[-1]
    torch.manual_seed(0)
    if real_batch is not None:
        model = model_module.build_model(cfg, args.features)
    else:
        model = model_module.GestureClassifier(args.features, cfg.model, max_len)
    fast_paths = device.type == "cpu" and not args.no_cpu_fast_paths
    if fast_paths:
        enable_cpu_fast_paths(model)
    model = model.to(device)
    n_parameters = sum(p.numel() for p in model.parameters())
    step_model = torch.compile(model, mode=args.compile_mode) if args.compile else model
    if hasattr(train_module, "build_optimizer"):  # the experiment's own optimizer settings
        optimizer = train_module.build_optimizer(model, cfg.trainer)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = build_ema(args.ema, model, cfg.trainer.ema_decay) if args.full_step else None

    if real_batch is not None:
        features, mask = real_batch
        lengths = mask.sum(dim=1)
        batches = [(features, mask)]
    else:
        if not 1 <= args.min_length <= args.length:
            parser.error(f"--min-length must be in [1, --length={args.length}], got {args.min_length}")
        batches, lengths = step_batches(args, generator)
    batches = [((f * m[..., None]).to(device), m.to(device)) for f, m in batches]
    demographics = (
        torch.tensor([[1.0, 30.0, 0.0, 1.0, 170.0, 55.0, 30.0]]).repeat(args.batch_size, 1).to(device)
    )
    labels = torch.randint(0, 18, (args.batch_size,), generator=generator).to(device)

    turn = iter(range(1 << 62))

    def step() -> None:
        features, mask = batches[next(turn) % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            outputs = step_model(features, mask, demographics)
        loss = train_module.compute_loss(outputs, labels, cfg.trainer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.full_step and cfg.trainer.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)

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
        f"{args.exp} | {name} | variant={args.variant} time_reduction={cfg.model.time_reduction} "
        f"bf16={args.bf16} compile={args.compile} cpu_fast_paths={fast_paths} "
        f"full_step={args.full_step}{f' ema={args.ema}' if args.full_step else ''} "
        f"{' '.join(args.overrides)} | "
        f"params {n_parameters / 1e6:.2f} M | batch {args.batch_size} x length {args.length} (max_len {max_len}, "
        f"{args.batching} batches x {len(batches)}, steps {', '.join(str(b[1].shape[1]) for b in batches[:8])}"
        f"{'...' if len(batches) > 8 else ''}, "
        f"real {int(lengths.min())}-{int(lengths.max())}, mean {lengths.float().mean():.1f}) | "
        f"rounds {per_round} | median {throughput:.1f} sequences/s ({seconds / args.steps * 1000:.0f} ms/step)"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=True) as profiler:
            for _ in range(args.steps):
                step()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(
            profiler.key_averages().table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=48)
        )
        print(
            profiler.key_averages(group_by_input_shape=True).table(
                sort_by=sort,
                row_limit=args.profile_rows,
                max_name_column_width=40,
                max_shapes_column_width=70,
            )
        )


if __name__ == "__main__":
    main()
