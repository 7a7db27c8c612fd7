"""Where a stacked step's GPU time goes: one training step of K runs as one model, timed as a
CUDA-graph replay and broken down by kernel (torch.profiler over eager steps).

    python benchmarks/profile_stack.py --batch 2 --stacks 27 --mixes mixed bn gn2 [--fused]

A mix is ``mixed`` (BN, LN, GN(2) in thirds: three segments per norm layer), one norm for all
runs (``bn``, ``ln``, ``gnG``), ``split`` (the mixed runs as three stacks of one norm each,
replayed side by side on three CUDA streams; ``--per-stack N`` cuts each norm's runs into stacks
of at most N, e.g. a batch size's 9 runs of the batch grid as its norms' stacks of 3 seeds) or
``singles`` (K single mixed runs, each its own model with the Triton kernels on its own stream:
today's way). Random data, bf16, channels_last, the recipe's SGD; no data loading, no
evaluation: this is the step alone, against which ``bench_stack.py``'s end-to-end figures can be
read.
"""
import argparse
import json
import time

import torch

from normstudy import models
from normstudy.stack import StackLoss


def specs_for(mix, k):
    """The stack's :class:`models.NormSpec` list for ``mix`` and ``k`` runs (sorted, as plan_stacks sorts)."""
    def one(name):
        if name == "bn":
            return models.norm_spec("bn")
        if name == "ln":
            return models.norm_spec("ln")
        return models.norm_spec("gn", groups=int(name[2:]))
    if mix == "mixed":
        names = ["bn"] * (k - 2 * (k // 3)) + ["ln"] * (k // 3) + ["gn2"] * (k // 3)
    else:
        names = [mix] * k
    return [one(name) for name in names]


def make_step(specs, *, batch, device, fused, channels_last, compile=False, single=False):
    """One training step of ``specs`` as one stacked model, or with ``single`` of the one run in
    ``specs`` as a plain ``CifarNet`` (LayerNorm as GroupNorm of one group)."""
    k = 1 if single else len(specs)
    model = models.CifarNet(stack=specs).to(device) if not single else models.CifarNet(
        "bn" if specs[0].kind == "bn" else "gn", groups=specs[0].groups or 2).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if fused:
        models.use_triton_kernels(model)
    forward = torch.compile(model) if compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)
    criterion = StackLoss([0.1] * k, device)
    x = torch.randn(batch, 3 * k, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch, k), device=device)

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = criterion(forward(x), y).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    return step


def capture(step):
    """The step as one CUDA graph (after warm-up steps on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def graph_ms(steps, *, iters):
    """Milliseconds per round of replays of the steps' CUDA graphs, each on its own stream."""
    graphs = [capture(step) for step in steps]
    streams = [torch.cuda.Stream() for _ in graphs]

    def round_():
        for stream, graph in zip(streams, graphs):
            with torch.cuda.stream(stream):
                graph.replay()
    for _ in range(10):
        round_()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        round_()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / iters


def steps_for(mix, k, *, batch, fused, channels_last, compile, per_stack=None):
    """The steps a mix replays side by side: one stacked step, or several."""
    options = dict(batch=batch, device="cuda", fused=fused, channels_last=channels_last, compile=compile)
    specs = specs_for("mixed" if mix in ("split", "singles") else mix, k)
    if mix == "singles":
        return [make_step([spec], single=True, **{**options, "fused": True}) for spec in specs]
    if mix == "split":
        return [make_step(stack, **options) for stack in split_stacks(specs, per_stack=per_stack)]
    return [make_step(specs, **options)]


def split_stacks(specs, *, per_stack=None):
    """``specs`` as stacks of one norm each, at most ``per_stack`` runs a stack (None: one stack a norm)."""
    stacks = []
    for kind in dict.fromkeys(specs):
        same = [spec for spec in specs if spec == kind]
        size = per_stack or len(same)
        stacks += [same[i:i + size] for i in range(0, len(same), size)]
    return stacks


def kernel_table(step, *, rows):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_time_total > 0) / 5
    busy = sum(e.device_time_total for e in events) / 5 / 1000
    return busy, kernels, events.table(sort_by="device_time_total", row_limit=rows, max_name_column_width=60)


def _at_least_one(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[2])
    p.add_argument("--stacks", type=int, nargs="+", default=[27])
    p.add_argument("--mixes", nargs="+", default=["mixed", "bn", "gn2"])
    p.add_argument("--fused", action="store_true", help="the Triton kernels (models.use_triton_kernels)")
    p.add_argument("--nchw", action="store_true")
    p.add_argument("--compile", action="store_true", help="the stacked model through torch.compile")
    p.add_argument("--per-stack", type=_at_least_one, help="with the split mix: at most this many runs a stack")
    p.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN's autotuner (grouped convolutions)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--json", help="append one line of results per case to this file")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    for batch in args.batch:
        for k in args.stacks:
            for mix in args.mixes:
                begin = time.perf_counter()
                steps = steps_for(mix, k, batch=batch, fused=args.fused, channels_last=not args.nchw,
                                  compile=args.compile, per_stack=args.per_stack)
                ms = graph_ms(steps, iters=args.iters)
                setup = time.perf_counter() - begin
                busy, kernels, table = kernel_table(steps[0], rows=args.rows)
                line = dict(batch=batch, k=k, mix=mix, per_stack=args.per_stack, streams=len(steps),
                            cudnn_benchmark=args.cudnn_benchmark, fused=args.fused, nchw=args.nchw,
                            compile=args.compile,
                            graph_ms=round(ms, 4), setup_s=round(setup, 1), gpu_busy_ms=round(busy, 4), kernels=kernels,
                            model_steps_per_s=round(k * 1000 / ms, 1))
                print(json.dumps(line))
                print(table)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
