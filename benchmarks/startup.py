"""Where a run's start-up seconds go: each stage of a run, timed alone, in a fresh process.

    python benchmarks/startup.py --data-dir /root/data --norm bn [--runtime '{"compile": true}']

Runs the stages that a run goes through before its steady epochs, in order (through the same
``fit.prepare`` that ``fit.fit`` calls), each ended by
a device synchronization, and prints one JSON line of seconds per stage:

    python     interpreter start (measured from the parent's clock when spawned by it)
    torch      ``import torch``
    project    importing this package (data, engine, network, recipe and what they import)
    cuda_init  creating the CUDA context
    data       reading the CIFAR-10 files
    model      building the model and its whitening initialization (CPU, models.fresh_model)
    to_device  the model to the device
    compile_triton_kernels  (fused kernels only) kernels.precompile: every Triton kernel, in parallel
    loaders    the uint8 images to the device, optimizer and schedule
    kernels    first forward + backward of a throw-away copy (loads cuDNN/cuBLAS kernels)
    step_512   recording (and, with compile, compiling) the step for full batches
    step_last  the same for the epoch's last, smaller batch
    epoch_1    the first whole epoch after that (train + test)
    epoch_2    the second
"""
import time

START = time.time()
import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402


def measure(args):
    stages = {}
    clock = [START]

    def lap(name, sync=None):
        if sync:
            sync()
        now = time.time()
        stages[name] = round(now - clock[0], 3)
        clock[0] = now

    if args.spawn_time:
        stages["python"] = round(START - args.spawn_time, 3)
    import torch
    lap("torch")
    from normstudy import data as data_lib, fit, loop, models, recipe as recipe_lib, runtime as runtime_lib
    lap("project")
    device = runtime_lib.pick_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    torch.empty(1, device=device)
    lap("cuda_init", sync)
    dataset = data_lib.load_cifar10(args.data_dir, download=False)
    lap("data")
    norm = args.norm
    recipe = recipe_lib.recipe_for(norm)
    model = models.fresh_model(norm, recipe, train_images=dataset["train_images"], seed=0)
    lap("model")
    # The run's own set-up, stage by stage (to_device, compile_triton_kernels, loaders).
    training = fit.prepare(model, dataset, recipe=recipe, device=device, seed=0, norm=norm,
                           runtime=json.loads(args.runtime or "{}"), on_stage=lambda name: lap(name, sync))
    runtime = training.runtime
    images, labels = next(iter(training.train_loader))
    scratch = copy.deepcopy(model)
    with torch.autocast(device.type, dtype=training.amp_dtype, enabled=training.amp_dtype is not None):
        torch.nn.functional.cross_entropy(scratch(images), labels).backward()
    del scratch
    lap("kernels", sync)
    step = training.make_step()
    step(images, labels)
    lap("step_512", sync)
    last = len(dataset["train_images"]) % recipe["batch_size"]
    if last:
        step(images[:last], labels[:last])
        lap("step_last", sync)
    for epoch in (1, 2):
        loop.train(model, device, training.train_loader, training.optimizer, training.criterion, training.scheduler,
                   progress=False, step=step)
        _, accuracy = loop.test(model, device, training.test_loader, training.criterion, amp_dtype=training.amp_dtype)
        lap(f"epoch_{epoch}", sync)
    stages["total"] = round(time.time() - (args.spawn_time or START), 3)
    print(json.dumps({"norm": norm, "runtime": runtime, "seconds": stages, "test_acc_epoch_2": accuracy}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--norm", default="bn")
    p.add_argument("--device", default="auto")
    p.add_argument("--runtime", help="JSON overrides of the fast runtime (normstudy.runtime)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spawn-time", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return measure(args)
    # A fresh child process, so that the interpreter's own start is counted too.
    cmd = [sys.executable, __file__, "--child", "--data-dir", args.data_dir, "--norm", args.norm,
           "--device", args.device, "--spawn-time", repr(time.time())]
    if args.runtime:
        cmd += ["--runtime", args.runtime]
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
