"""Speed benchmark: the project's pipeline against a classic torchvision pipeline, same device.

    python benchmarks/bench_train.py --data-dir /root/data --norms bn ln gn --epochs 20

(a) project: uint8 images on the device, whole-epoch augmentation there, bf16 autocast,
    channels_last, every training step replayed as a CUDA graph (the fast runtime's defaults).
(b) classic: torchvision CIFAR10 + RandomCrop/RandomHorizontalFlip/ToTensor/Normalize, DataLoader
    with 4 workers, fp32, the same model, optimizer and one-cycle schedule, eager.

Each run is a fresh child process, so "run wall" counts everything from process start to the
final metrics (imports, data loading, warm-up, graph recording, compilation). With several norms
the project's pipeline also trains all of them one after another in a single process, as
``train.py --norm all`` does. Writes ``results.json`` and
``results.md`` beside this file (or into --out), with the floors the hardware sets on one step.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# --- child: one pipeline, one norm --------------------------------------------------------------

def _classic_fit(model, recipe, data_dir, device, seed):
    import torch
    import torchvision
    from torchvision import transforms

    from normstudy import data as data_lib
    from normstudy import recipe as recipe_lib

    class CIFAR10(torchvision.datasets.CIFAR10):
        # The lossless rebuild of the dataset differs from the original md5 sums: skip the checks.
        def _check_integrity(self):
            return True

        def _load_meta(self):
            self.classes = list(data_lib.CLASSES)
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    normalize = transforms.Normalize(data_lib.MEAN, data_lib.STD)
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=recipe["crop_padding"]),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
    test_tf = transforms.Compose([transforms.ToTensor(), normalize])
    torch.manual_seed(seed)
    train_set = CIFAR10(data_dir, train=True, transform=train_tf)
    recipe_lib.initialize(model, recipe, torch.from_numpy(train_set.data).permute(0, 3, 1, 2))
    loader_kw = dict(batch_size=recipe["batch_size"], num_workers=4, pin_memory=True, persistent_workers=True)
    train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, **loader_kw)
    test_loader = torch.utils.data.DataLoader(CIFAR10(data_dir, train=False, transform=test_tf), **loader_kw)
    model.to(device)
    optimizer = recipe_lib.make_optimizer(model, recipe)
    scheduler = recipe_lib.make_scheduler(optimizer, recipe, steps_per_epoch=len(train_loader))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
    history = {"test_acc": [], "epoch_seconds": []}
    for _ in range(recipe["epochs"]):
        start = time.perf_counter()
        model.train()
        for images, labels in train_loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            criterion(model(images), labels).backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in test_loader:
                correct += (model(images.to(device)).argmax(1) == labels.to(device)).sum().item()
        history["epoch_seconds"].append(time.perf_counter() - start)
        history["test_acc"].append(100.0 * correct / len(test_loader.dataset))
    return history


def child(args):
    import torch
    imported = time.time()

    from normstudy import data as data_lib, fit, models, recipe as recipe_lib, runtime as runtime_lib

    device = runtime_lib.pick_device(args.device)
    histories = {}
    runtime = dict(json.loads(args.runtime)) if args.runtime else None
    dataset = None
    for norm in args.norm.split(","):  # several norms: one after another in this one process
        recipe = recipe_lib.recipe_for(norm, epochs=args.epochs)
        if args.pipeline == "classic":
            fit.seed_everything(args.seed)
            model = models.CifarNet(norm, **recipe_lib.model_kwargs(recipe))
            histories[norm] = _classic_fit(model, recipe, args.data_dir, device, args.seed)
            continue
        if dataset is None:
            dataset = data_lib.load_cifar10(args.data_dir, download=False)
            loaded = time.time()
        model = models.fresh_model(norm, recipe, train_images=dataset["train_images"], seed=args.seed)
        histories[norm] = fit.fit(model, dataset, norm=norm, recipe=recipe, device=device, seed=args.seed,
                                     progress=False, log=lambda line: print(line, file=sys.stderr),
                                     runtime=runtime)
    if device.type == "cuda":
        torch.cuda.synchronize()
    phases = {"import_s": imported - args.spawn_time}
    if args.pipeline != "classic":
        phases["data_s"] = loaded - imported
    print(json.dumps({"end_time": time.time(), "histories": histories, "phases": phases,
                      "device": torch.cuda.get_device_name() if device.type == "cuda" else device.type}))


# --- parent -------------------------------------------------------------------------------------

def run_child(pipeline, norm, args, runtime=None):
    cmd = [sys.executable, __file__, "--child", "--pipeline", pipeline, "--norm", norm,
           "--epochs", str(args.epochs), "--data-dir", args.data_dir, "--device", args.device]
    start = time.time()
    cmd += ["--spawn-time", repr(start)]
    if runtime:
        cmd += ["--runtime", json.dumps(runtime)]
    env = dict(os.environ)
    if args.fresh_caches:  # compile every Triton/inductor kernel anew, as on a new machine
        cache = tempfile.mkdtemp(prefix="bench-cache-")
        env.update(TRITON_CACHE_DIR=f"{cache}/triton", TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{pipeline}/{norm} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "," in norm:  # all variants in one process: its wall time and each variant's accuracy
        return {"run_wall_s": result["end_time"] - start, "device": result["device"], "phases": result["phases"],
                "test_acc_last3_mean": {n: statistics.mean(h["test_acc"][-3:])
                                        for n, h in result["histories"].items()}}
    history = result["histories"][norm]
    times = history["epoch_seconds"]
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"steady_epoch_s": steady, "first_epoch_s": times[0],
            "run_wall_s": result["end_time"] - start, "images_per_s": 50000 / steady,
            "test_acc_last3_mean": statistics.mean(history["test_acc"][-3:]),
            "epoch_seconds": times, "device": result["device"], "phases": result["phases"]}


def floors(norm, device_name):
    """Bytes and FLOPs of one training step at batch 512, over measured bandwidth and matmul rate."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from normstudy import models
    model = models.CifarNet(norm).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(512, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (512,), device="cuda")
    activation_bytes = 0

    def count(module, inputs, output):
        nonlocal activation_bytes
        activation_bytes += 2 * (inputs[0].numel() + output.numel())  # read input, write output, bf16

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", dtype=torch.bfloat16):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    for hook in hooks:
        hook.remove()
    flops = counter.get_total_flops()
    # Backward reads each layer's input and output gradient and writes the input gradient:
    # about twice the forward traffic, so a step moves at least ~3x the forward bytes.
    step_bytes = 3 * activation_bytes

    def timed(fn, repeat=20):
        fn()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / repeat

    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / timed(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    matmul_rate = 2 * 8192 ** 3 / timed(lambda: a @ b)
    return {"step_flops": flops, "step_bytes_estimate": step_bytes, "bandwidth_bytes_per_s": bandwidth,
            "bf16_matmul_flops_per_s": matmul_rate, "memory_floor_step_s": step_bytes / bandwidth,
            "compute_floor_step_s": flops / matmul_rate,
            "epoch_floor_s": 98 * max(step_bytes / bandwidth, flops / matmul_rate)}


def table(results):
    lines = [f"| variant | pipeline | steady s/epoch | first epoch s | {results['epochs']}-epoch run wall s | images/s | "
             "test acc (last 3) | speed-up (b)/(a) |", "|---|---|---|---|---|---|---|---|"]
    for norm, pipelines in results["runs"].items():
        project = pipelines["project"]["steady_epoch_s"]
        for name, r in pipelines.items():
            ratio = f"{r['steady_epoch_s'] / project:.1f}x" if name == "classic" else ""
            name += " *" if r.get("note") else ""  # a row carried over from an earlier run
            lines.append(f"| {norm} | {name} | {r['steady_epoch_s']:.3f} | {r['first_epoch_s']:.2f} | "
                         f"{r['run_wall_s']:.1f} | {r['images_per_s']:,.0f} | "
                         f"{r['test_acc_last3_mean']:.2f} % | {ratio} |")
    text = "\n".join(lines) + "\n"
    notes = {r["note"] for pipelines in results["runs"].values() for r in pipelines.values() if r.get("note")}
    text += "".join(f"\n\\* {note}\n" for note in sorted(notes))
    if "all_variants_wall_s" in results:
        together = results["all_variants_one_process"]
        text += (f"\nAll variants, {results['epochs']}-epoch runs: {results['all_variants_wall_s']:.1f} s as separate processes, "
                 f"{together['run_wall_s']:.1f} s one after another in one process (test acc "
                 + ", ".join(f"{n} {a:.2f} %" for n, a in together["test_acc_last3_mean"].items()) + ").\n")
    if "all_variants_warm_cache_wall_s" in results:  # merged from a second run with warm caches
        text += (f"With warm kernel caches: {results['all_variants_warm_cache_wall_s']:.1f} s as separate processes, "
                 f"{results['all_variants_one_process_warm_cache']['run_wall_s']:.1f} s in one process.\n")
    caches = results.get("kernel_caches")
    if isinstance(caches, dict):
        caches = "; ".join(f"{name}: {how}" for name, how in caches.items())
    caches = f" Triton/inductor kernel caches: {caches}." if caches else ""
    python = f" Python bytecode: {results['python_bytecode']}." if "python_bytecode" in results else ""
    return text + f"\nDevice: {results['device']}.{caches}{python}\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--norms", nargs="+", default=["bn", "ln", "gn"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--pipelines", nargs="+", default=["project", "classic"])
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help='extra project runtime, e.g. eager=\'{"cuda_graph": false}\'')
    p.add_argument("--fresh-caches", action="store_true",
                   help="each run starts with empty Triton and inductor caches (kernel compilation counted)")
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pipeline", help=argparse.SUPPRESS)
    p.add_argument("--norm", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runtime", help=argparse.SUPPRESS)
    p.add_argument("--spawn-time", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    runs, device = {}, None
    variants = [(name, name, None) for name in args.pipelines]
    variants += [(v.split("=", 1)[0], "project", json.loads(v.split("=", 1)[1])) for v in args.variant]
    for norm in args.norms:
        runs[norm] = {}
        for name, pipeline, runtime in variants:
            runs[norm][name] = run_child(pipeline, norm, args, runtime)
            device = runs[norm][name].pop("device")
            print(norm, name, {k: v for k, v in runs[norm][name].items() if k != "epoch_seconds"}, flush=True)
    results = {"device": device, "epochs": args.epochs, "runs": runs,
               "kernel_caches": "empty at the start of each run" if args.fresh_caches else "as found"}
    if "project" in args.pipelines and len(args.norms) > 1:
        results["all_variants_wall_s"] = sum(r["project"]["run_wall_s"] for r in runs.values())
        together = run_child("project", ",".join(args.norms), args)
        device = together.pop("device")
        results["all_variants_one_process"] = together
        print("all variants in one process", together, flush=True)
    if device and device not in ("cpu", "mps"):
        results["floors"] = {norm: floors(norm, device) for norm in args.norms}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(table(results))
    print(table(results))
    print(json.dumps(results.get("floors", {}), indent=1))


if __name__ == "__main__":
    main()
