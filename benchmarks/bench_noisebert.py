"""Step time of NoiseBERT pretraining: no regularizer vs the hooked CLS row vs eager output_attentions.

    python benchmarks/bench_noisebert.py [--batch-size 16 --length 256 --features 16 --rounds 2]
        [--layers last|all] [model.key=value ...]

One step = forward + masked MSE (+ lambda x CLS-attention penalty) + backward + AdamW, on random
inputs with padding, noisy intervals and masked spans, at the default model dims unless
overridden. Variants, timed in alternating rounds (the median step of each is reported):

- ``lambda=0 (sdpa)``: masked reconstruction only, no attention row computed;
- ``hooked CLS row (sdpa)``: the regularizer with the CLS row recomputed from the hooked
  query/key projections while BERT runs fused SDPA;
- ``output_attentions (eager)``: the regularizer with the row taken from the full eager
  attention maps (what the hooks avoid).

On CPU the models get the CPU fast paths (``enable_cpu_fast_paths``), as pretraining on CPU does.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from omegaconf import OmegaConf

from codes.models.cpu_fast_paths import enable_cpu_fast_paths
from codes.noisebert.config import ModelConfig
from codes.noisebert.loss import attention_penalty, masked_mse
from codes.noisebert.model import NoiseBERT


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", default="last", choices=["last", "all"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("overrides", nargs="*", help="model.key=value")
    args = parser.parse_args()

    cfg = OmegaConf.create({"model": OmegaConf.structured(ModelConfig)})
    cfg.merge_with_dotlist(list(args.overrides))
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    b, length = args.batch_size, args.length
    lengths = torch.randint(length // 2, length + 1, (b,), generator=generator)
    padding = torch.arange(length)[None] < lengths[:, None]
    target = torch.randn(b, length, args.features, generator=generator) * padding[..., None]
    masked = (torch.rand(b, length, generator=generator) < 0.15) & padding
    noisy = torch.zeros(b, length, dtype=torch.bool)
    noisy[:, length // 4 : length // 4 + 40] = True
    noisy &= padding & ~masked
    inputs = torch.where(masked[..., None], 0.0, target + noisy[..., None] * torch.randn_like(target))
    inputs, target, masked, noisy, padding = (t.to(device) for t in (inputs, target, masked, noisy, padding))

    variants = {
        "lambda=0 (sdpa)": ("sdpa", False, False),
        "hooked CLS row (sdpa)": ("sdpa", True, False),
        "output_attentions (eager)": ("eager", True, True),
    }
    models, optimizers = {}, {}
    for name, (implementation, _, _) in variants.items():
        model_cfg = cfg.model.copy()
        model_cfg.bert.attn_implementation = implementation
        torch.manual_seed(0)
        model = NoiseBERT(args.features, model_cfg, length, args.layers)
        if device.type == "cpu":
            enable_cpu_fast_paths(model)
        models[name] = model.to(device).train()
        optimizers[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4, fused=True)

    def step(name: str) -> None:
        _, regularized, eager = variants[name]
        model, optimizer = models[name], optimizers[name]
        out = model(inputs, padding, masked, return_cls_attention=regularized, from_output_attentions=eager)
        loss = masked_mse(out["reconstruction"], target, masked)
        if regularized:
            loss = loss + attention_penalty(out["cls_attention"], noisy)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times: dict[str, list[float]] = {name: [] for name in variants}
    for name in variants:
        for _ in range(args.warmup):
            step(name)
    for _ in range(args.rounds):
        for name in variants:
            for _ in range(args.steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                step(name)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - started)
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    base = statistics.median(times["lambda=0 (sdpa)"])
    print(
        f"NoiseBERT step | {machine} | batch {b} x length {length} | layers={args.layers} {' '.join(args.overrides)}"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:28s} {median * 1000:8.0f} ms/step  ({(median / base - 1) * 100:+5.1f}% vs lambda=0)")


if __name__ == "__main__":
    main()
