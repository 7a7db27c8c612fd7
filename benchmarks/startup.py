"""Where a run's start-up seconds go: each stage of a run, timed alone, in a fresh process.

    python benchmarks/startup.py --data-dir /root/data --norm bn [--runtime '{"compile": true}']
    python benchmarks/startup.py --data-dir /root/data --norm bn --profile prepare.txt   # where set-up goes

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
    checkpoint one epoch's checkpoint written (a run writes one after every epoch)

and then the end of a run, as ``run.finish_run`` and ``train.py`` go through it (into a temporary
folder):

    pyplot        importing pyplot and a first text layout (``plots.warm_up``; a run does this on
                  a thread while its epochs run, so it is counted here but hidden in a run)
    tta_weights_record  ``run.finish_run`` without figures: the final test with flipped images,
                  ``weights.pt``, ``record.json``
    figures       ``curves.png`` and ``misclassified.png`` (one more test pass to find them)
    summary       the folder's ``summary.json``, ``results.md`` and figures
    exit          (printed by the parent) the process's end: its wall less the child's ``total``
    wall          (printed by the parent) the whole process

With ``--profile FILE``, the run's set-up (``fit.prepare``: to the device, the Triton kernels'
compile and self-check, loaders) runs under ``cProfile`` and FILE gets its 40 most expensive
calls by cumulative time (the stages' seconds then include the profiler's overhead). cProfile
sees the calling thread only: kernels compiled on worker threads show as the wait for them.
"""
import time

START = time.time()
import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


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
    with profiled(args.profile):
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
    history = fit.new_history()
    for epoch in (1, 2):
        begin, lr = time.time(), float(training.optimizer.param_groups[0]["lr"])
        train_loss, train_acc = loop.train(model, device, training.train_loader, training.optimizer,
                                           training.criterion, training.scheduler, progress=False, step=step)
        test_loss, accuracy = loop.test(model, device, training.test_loader, training.criterion,
                                        amp_dtype=training.amp_dtype)
        lap(f"epoch_{epoch}", sync)
        for key, value in zip(history, (train_loss, train_acc, test_loss, accuracy, lr, time.time() - begin)):
            history[key].append(value)
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        end_of_run(Path(tmp), model=model, training=training, dataset=dataset, device=device, norm=norm,
                   history=history, lap=lap, sync=sync)
    gc.freeze()  # as a command does once its work is done (stopping.work_done), so "exit" is a command's
    stages["total"] = round(time.time() - (args.spawn_time or START), 3)
    print(json.dumps({"norm": norm, "runtime": runtime, "seconds": stages, "test_acc_epoch_2": accuracy}), flush=True)


@contextlib.contextmanager
def profiled(path):
    """Run the body under cProfile and write its 40 most expensive calls (cumulative) to ``path``;
    nothing when ``path`` is ``None``."""
    if path is None:
        yield
        return
    import cProfile
    import io
    import pstats
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
        Path(path).write_text(text.getvalue())


def end_of_run(folder, *, model, training, dataset, device, norm, history, lap, sync):
    """The stages after the epochs (see the module docstring), each timed with ``lap``, through
    the run's own functions: a real record in ``folder``, which the summary then reads."""
    from normstudy import checkpoints, plots, run as run_lib, summary
    from normstudy.config import RunConfig
    checkpoints.save_torch(folder / "checkpoint.pt", checkpoints.make_checkpoint(
        model=model, optimizer=training.optimizer, scheduler=training.scheduler,
        generator=training.train_loader.generator, history=history, run={"norm": norm}, scaler=training.scaler))
    lap("checkpoint")
    plots.warm_up()
    lap("pyplot")
    config = RunConfig(norm=norm, seed=0, epochs=len(history["test_acc"]))
    run_dir = folder / config.run_id
    run_dir.mkdir()
    run_lib.claim_folder(run_dir, config)  # config.json, as a run writes it before its first epoch
    record = run_lib.finish_run(config, run_dir, model=model, history=history, runtime=training.runtime,
                                device=device, dataset=dataset, figures=False, seconds=0.0)
    lap("tta_weights_record", sync)
    run_lib.write_run_figures(run_dir, record, model=model, device=device, dataset=dataset)
    lap("figures", sync)
    if summary.write_summary(folder) is None:
        from normstudy import report
        raise SystemExit(f"startup.py: {run_dir.name} did not count as a finished run: nothing summarized "
                         f"({'; '.join(report.load_records(folder)[1])})")
    lap("summary")
    return record


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--norm", default="bn")
    p.add_argument("--device", default="auto")
    p.add_argument("--runtime", help="JSON overrides of the fast runtime (normstudy.runtime)")
    p.add_argument("--profile", metavar="FILE", help="profile the run's set-up (fit.prepare) into FILE")
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
    if args.profile:
        cmd += ["--profile", str(Path(args.profile).resolve())]
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - start
    sys.stderr.write(done.stderr)
    if done.returncode:
        raise SystemExit(f"startup.py: the measured process exited {done.returncode}")
    line = json.loads(done.stdout.strip().splitlines()[-1])
    line["seconds"]["exit"] = round(wall - line["seconds"]["total"], 3)  # the child's clock starts at spawn too
    line["seconds"]["wall"] = round(wall, 3)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
