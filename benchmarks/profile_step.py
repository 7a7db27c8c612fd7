"""Where one training step's GPU time goes: torch.profiler over eager steps, top kernels.

    python benchmarks/profile_step.py --norm bn [--nchw] [--fp32] [--compile] [--unfused]

Eager steps run the same kernels as the CUDA-graph replay, so their kernel times show what the
replayed step costs (the graph removes only the launch gaps between them).
"""
import argparse

import torch

from normstudy import data, fit, models, recipe as recipe_lib


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--norm", default="bn")
    p.add_argument("--nchw", action="store_true")
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--compile", action="store_true", help="the model's forward through torch.compile")
    p.add_argument("--unfused", action="store_true", help="PyTorch's modules, not the Triton kernels")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    overrides = {"channels_last": not args.nchw, "amp": None if args.fp32 else "bf16", "compile": args.compile,
                 "cuda_graph": False}  # eager steps: the profiler sees each kernel
    if args.unfused:
        overrides["triton_kernels"] = False
    # The run's own set-up (fit.prepare) on small synthetic data: the recipe's loss, optimizer, layout.
    dataset = data.load_synthetic_cifar10(n_train=1024, n_test=256)
    recipe = recipe_lib.recipe_for(args.norm)
    model = models.fresh_model(args.norm, recipe, train_images=dataset["train_images"], seed=0)
    training = fit.prepare(model, dataset, recipe=recipe, device="cuda", seed=0, runtime=overrides, norm=args.norm)
    step = training.make_step()
    runtime = training.runtime
    x = torch.randn(512, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (512,), device="cuda")
    for _ in range(5):
        step(x, y)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step(x, y)
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events) / 10
    print(f"{args.norm} {'nchw' if args.nchw else 'channels_last'} {'fp32' if args.fp32 else 'bf16'}: "
          f"{'compiled ' if args.compile else ''}{'triton kernels ' if runtime['triton_kernels'] else ''}"
          f"GPU time per step {total / 1000:.3f} ms")
    print(events.table(sort_by="device_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
