"""The one unit of work: :func:`run_one` takes a :class:`~normstudy.config.RunConfig` and returns
its record, plain JSON-able data (the config, the recipe, the history, the final figures), so a
worker on another machine can return it as it is.

A run owns the folder ``OUT/<run id>/``:

    config.json       the configuration, written first (the folder is claimed by it)
    checkpoint.pt     the last complete epoch (resume from it)
    record.json       the record, written last: a folder with one is finished and never redone
    weights.pt        the trained model's state_dict
    curves.png        loss and accuracy per epoch
    misclassified.png ten misclassified test images

A folder whose configuration differs from the run's is refused (no two configurations ever share
one); a folder another process is training in is refused, naming that process; an interrupted
run is continued only with ``resume=True`` and started over only with ``restart=True``. The
temporary files of a run killed mid-write (``.NAME.*.tmp``) are removed when the next run of the
folder takes its lock.
"""
import contextlib
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import checkpoints
from . import data as data_lib
from . import fit as fit_lib
from . import loop
from . import models
from . import plots
from . import recipe as recipe_lib
from . import runtime as runtime_lib
from .config import RunConfig
from .runtime import DEVICE_LOCK


class RunFolderError(ValueError):
    """A run folder belongs to another configuration, is in use, or holds an interrupted run."""


class RunFolderBusy(RunFolderError):
    """A run folder is in use: another process (``holder``, e.g. "process 1234") trains the run."""

    def __init__(self, message, holder):
        super().__init__(message)
        self.holder = holder


def load_data(config, *, data_dir="./data", download=True):
    """The dataset ``config`` trains on: CIFAR-10 from ``data_dir`` (or small synthetic data), with
    ``config.holdout`` training images held out as its test set when asked."""
    if config.data == "synthetic":
        dataset = data_lib.load_synthetic_cifar10()
    else:
        dataset = data_lib.load_cifar10(data_dir, download=download)
    return data_lib.holdout_split(dataset, config.holdout) if config.holdout else dataset


def network(config):
    """``config``'s network, its structure only: built on the meta device, so it takes no memory
    and draws no random numbers (:func:`fit.compile_ahead` needs no more)."""
    choices = dict(config.choices)
    if choices.get("renorm"):
        choices["steps_per_epoch"] = 1  # Batch Renorm's schedule: its length does not change the structure
    with torch.device("meta"):
        return models.CifarNet(config.norm, **recipe_lib.model_kwargs(config.recipe), **choices)


def warm_up_in_background(config, *, device, runtime=None):
    """On CUDA, a daemon thread that readies the device for ``config``'s run while a command reads
    the data: the CUDA context and cuDNN (:func:`runtime.warm_up_device`), then the run's Triton
    kernels compiled (:func:`fit.compile_ahead`: ~1 s of a run's set-up on the H200, warm cache);
    meanwhile, on a thread of its own, Triton's cache key (:data:`runtime.TRITON_KEY`), if the run
    uses the kernels. Draws no random numbers; errors are left for the run to meet. Returns the
    thread (join it before the process ends), or ``None`` off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    runtime_lib.TRITON_KEY.start(when=lambda: fit_lib.uses_kernels(network(config), device, runtime))
    return runtime_lib.warm_up_device_in_background(
        device, then=lambda: fit_lib.compile_ahead(network(config), device, runtime))


REQUIRED = ("config", "recipe", "device", "params", "final", "history")
# What _train writes and the summaries read: a record lacking any of them is broken.
FINAL = ("test_acc", "test_acc_last3_mean", "test_acc_last3_min", "test_acc_best", "train_acc", "train_loss",
         "seconds_per_epoch", "test_acc_tta_flip")
HISTORY = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_record(record):
    """Raise ``ValueError`` (or ``TypeError``/``AttributeError``/``KeyError`` for wrong types) saying what a
    summary could not use in ``record``: a missing key, a figure that is not a number, a history
    that does not cover every epoch of its configuration."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    missing = [key for key in REQUIRED if key not in record]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    config = RunConfig.from_dict(record["config"])
    if not isinstance(record["device"], str) or not _is_number(record["params"]):
        raise ValueError("device or params of the wrong type")
    bad = [key for key in FINAL if not _is_number(record["final"].get(key))]
    if bad:
        raise ValueError(f"final figures missing or not numbers: {', '.join(bad)}")
    history = record["history"]
    bad = [key for key in HISTORY if not isinstance(history.get(key), list) or len(history[key]) != config.epochs
           or not all(map(_is_number, history[key]))]
    if bad:
        raise ValueError(f"history incomplete ({', '.join(bad)}: expected {config.epochs} numbers each)")


def read_record(run_dir):
    """The finished record in ``run_dir``, or ``None`` if the run has not finished there;
    :class:`RunFolderError` (one line) if the record cannot be read or lacks what a record has."""
    path = Path(run_dir) / "record.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        check_record(record)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as err:
        raise RunFolderError(f"{path}: unreadable record ({err}); move the folder away to rerun") from None
    return record


FAILURE_FILE = "failure.json"  # why a run's last attempt failed; removed when the run finishes


def note_failure(run_dir, *, reason, details=""):
    """Write ``failure.json`` in ``run_dir`` (if the folder exists): ``reason`` (one line) and
    ``details`` (a traceback) of the run's last failed attempt, and when. A runner reports its
    failures when its grid ends; a grid stopped or killed before then still says, through these
    files, why its missing runs are missing (:func:`report.load_failures`). The run's next attempt
    that finishes removes the file."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        checkpoints.write_json(run_dir / FAILURE_FILE, {"reason": reason, "details": details,
                                                        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def read_failure(run_dir):
    """The one-line reason of ``run_dir``'s last failed attempt, or ``None`` (none, or unreadable)."""
    try:
        reason = json.loads((Path(run_dir) / FAILURE_FILE).read_text())["reason"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return reason if isinstance(reason, str) else None


def summary_figures(history):
    """The final figures of one history: last, mean and worst of the last 3 epochs, best epoch,
    last training accuracy, steady seconds per epoch (the median: the first carries warm-up)."""
    last3 = history["test_acc"][-3:]
    return {"test_acc": history["test_acc"][-1], "test_acc_last3_mean": statistics.mean(last3),
            "test_acc_last3_min": min(last3), "test_acc_best": max(history["test_acc"]),
            "train_acc": history["train_acc"][-1], "train_loss": history["train_loss"][-1],
            "seconds_per_epoch": statistics.median(history["epoch_seconds"])}


CHANCE = 100.0 / len(data_lib.CLASSES)  # % test accuracy of a guess: CIFAR-10 and its synthetic stand-in
COLLAPSE_MARGIN = 1.0  # points of accuracy: a run this close to chance learned nothing


def collapsed(final):
    """Whether a run's final figures (:func:`summary_figures`) put it at chance: its mean test
    accuracy of the last 3 epochs within :data:`COLLAPSE_MARGIN` points of :data:`CHANCE`
    (e.g. GroupNorm with 32 groups here, whose pooled features cannot depend on the image)."""
    return abs(final["test_acc_last3_mean"] - CHANCE) <= COLLAPSE_MARGIN


def is_collapsed(record):
    """A record's ``"collapsed"`` field; records written before it existed are judged by their figures."""
    flag = record.get("collapsed")
    return flag if isinstance(flag, bool) else collapsed(record["final"])


def collapse_line(record):
    """The one line that says a finished run collapsed to chance."""
    line = (f"collapsed: test accuracy {record['final']['test_acc_last3_mean']:.2f} % (mean of the last 3 epochs) "
            f"is within {COLLAPSE_MARGIN:g} point of chance ({CHANCE:g} %): the network learned nothing")
    if record["config"].get("data") == "synthetic":  # `--smoke` at batch 512 takes two steps: often chance
        line += " (a smoke run: its few steps may be too few to learn)"
    return line


@contextlib.contextmanager
def folder_lock(run_dir):
    """Hold ``run_dir/.lock`` while training; a second process gets :class:`RunFolderBusy` naming
    the one holding it. (No-op where ``fcntl`` is missing, i.e. on Windows.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(run_dir) / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunFolderBusy(f"{run_dir} is in use by {holder}; wait for it or use another --out",
                                holder) from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()


def claim_folder(run_dir, config):
    """Create ``run_dir`` for ``config`` or check that it already belongs to it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    if path.is_file():
        try:
            theirs = RunConfig.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as err:
            raise RunFolderError(f"{path}: unreadable configuration ({err}); move the folder away") from None
        if theirs != config:
            raise RunFolderError(f"{run_dir} holds another configuration ("
                                 + "; ".join(config.differences(theirs)) + "); use another --out")
    else:
        checkpoints.write_json(path, config.to_dict())


def run_one(config: RunConfig, out: str | os.PathLike, *, dataset: dict | None = None,
            data_dir: str | os.PathLike = "./data", download: bool = True, device: str | torch.device = "auto",
            runtime: str | dict | None = None, resume: bool = False, restart: bool = False, figures: bool = True,
            progress: bool = True, log: Callable[[str], object] = print) -> dict:
    """Train ``config`` into ``out/<run id>/`` and return its record (see the module docstring).

    A finished run is not redone: its record is returned as it is. ``dataset`` (as
    :func:`load_data` returns it for this config) saves reading the files again when many runs
    share it. ``runtime``: a preset name or overrides (see :func:`fit.resolve_runtime`).
    """
    run_dir = Path(out) / config.run_id
    record = finished_record(run_dir, config)
    if record is not None:
        return record
    run_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(run_dir):  # every file of the folder is written holding its lock
        record = finished_record(run_dir, config)  # again: another process may have finished it meanwhile
        if record is not None:
            return record
        prepare_folder(run_dir, config, log=log)
        options = fit_lib.FitOptions(device=device, runtime=runtime, resume=resume, progress=progress, log=log)
        return _train(config, run_dir, options=options, dataset=dataset, data_dir=data_dir, download=download,
                      restart=restart, figures=figures)


def finished_record(run_dir, config):
    """The record of ``config`` finished in ``run_dir``, or ``None``; :class:`RunFolderError` if
    the folder holds another configuration's record (or a broken one)."""
    record = read_record(run_dir)
    if record is not None and RunConfig.from_dict(record["config"]) != config:
        raise RunFolderError(f"{run_dir} holds another configuration; use another --out")
    return record


def prepare_folder(run_dir, config, *, log):
    """Claim ``run_dir`` for ``config`` (:func:`claim_folder`) and remove the temporary files a
    killed run left there; call it holding the folder's lock."""
    claim_folder(run_dir, config)
    stale = checkpoints.remove_stale_temporaries(run_dir)
    if stale:
        log(f"{config.run_id}: removed {len(stale)} temporary file(s) of a killed run: {', '.join(stale)}")


def checkpoint_to_resume(run_dir, *, resume, restart):
    """``(path of the run's checkpoint, whether to resume from it)``; an interrupted run is
    continued only with ``resume`` and started over (its checkpoint deleted) only with ``restart``."""
    checkpoint = Path(run_dir) / "checkpoint.pt"
    if checkpoint.exists() and not (resume or restart):
        raise RunFolderError(f"{run_dir} holds an interrupted run ({checkpoint.name}); pass --resume to "
                             "continue it or --restart to start it over")
    if restart:
        checkpoint.unlink(missing_ok=True)
    return checkpoint, resume and checkpoint.exists()


def _train(config, run_dir, *, options, dataset, data_dir, download, restart, figures):
    """Train ``config`` in ``run_dir`` (held) as ``options`` (:class:`fit.FitOptions`) say."""
    checkpoint, resume = checkpoint_to_resume(run_dir, resume=options.resume, restart=restart)
    start = time.perf_counter()
    device = options.device
    device = runtime_lib.pick_device(device) if isinstance(device, str) else torch.device(device)
    dataset = dataset if dataset is not None else load_data(config, data_dir=data_dir, download=download)
    recipe = config.recipe
    with DEVICE_LOCK.work():  # seeding touches the CUDA generator: never during another run's recording
        model = models.fresh_model(config.norm, recipe, train_images=dataset["train_images"], seed=config.seed,
                                   choices=config.choices)
    # The runtime the run had (fit may switch the Triton kernels off): this run's, even while
    # runs in other threads switch them off for the process.
    used = {}

    def prepared(training):
        used.update(training.runtime)
        if figures:  # the figures' fixed cost while the epochs run, not after them
            plots.warm_up_in_background()

    options = dataclasses.replace(options, device=device, checkpoint_path=checkpoint, resume=resume,
                                  on_prepared=prepared)
    history = fit_lib.fit(model, dataset, norm=config.norm, recipe=recipe, seed=config.seed, options=options)
    return finish_run(config, run_dir, model=model, history=history, runtime=used, device=device, dataset=dataset,
                      figures=figures, seconds=time.perf_counter() - start, log=options.log)


def finish_run(config, run_dir, *, model, history, runtime, device, dataset, figures, seconds, extra=None,
               log=print):
    """The end of a trained run: its final figures (flip TTA included), ``weights.pt``, the
    figures and, last, ``record.json``; returns the record. ``extra``: more record keys (a run
    trained in a stack says so)."""
    with DEVICE_LOCK.work():  # evaluation and figures run on the GPU too (see runtime.RecordingLock)
        test_loader = data_lib.test_loader(dataset, device=device)
        tta = loop.test(model, device, test_loader, torch.nn.CrossEntropyLoss(), tta_flip=True)[1]
        record = {"id": config.run_id, "config": config.to_dict(), "recipe": config.recipe,
                  "device": runtime_lib.device_name(device), "runtime": runtime,
                  "evaluated_on": f"{config.holdout} held-out training images" if config.holdout else "test set",
                  "data_fingerprint": data_lib.fingerprint(dataset),  # what it trained on (scripts/redraw_figures.py)
                  "params": sum(p.numel() for p in model.parameters()),
                  "final": {**summary_figures(history), "test_acc_tta_flip": tta},
                  "collapsed": collapsed(summary_figures(history)),
                  "history": history, "seconds": seconds, **(extra or {})}
        checkpoints.save_torch(Path(run_dir) / "weights.pt", model.state_dict())
        if figures:
            write_run_figures(run_dir, record, model=model, device=device, dataset=dataset)
    checkpoints.write_json(Path(run_dir) / "record.json", record)  # last: the run is finished
    (Path(run_dir) / FAILURE_FILE).unlink(missing_ok=True)  # an earlier attempt's failure is history
    if record["collapsed"]:  # a run at chance ends without error: say so
        log(f"{config.run_id}: {collapse_line(record)}")
    return record


def write_run_figures(run_dir, record, *, model, device, dataset):
    """``curves.png`` and ``misclassified.png`` of one run, from its record and trained model."""
    config = RunConfig.from_dict(record["config"])
    title = f"{config.label}, batch {config.batch_size}, seed {config.seed}"
    history = record["history"]
    # The curves (12 inches wide, laid out by tight_layout) are saved as they are, in one rendering
    # (every run, and the command's start-up, pays for it); the misclassified gallery is 5 inches
    # wide, narrower than a long title (e.g. GroupNorm (16 groups), Conv→Norm→ReLU, ...), which
    # only the tight crop keeps whole.
    with plots.FIGURE_LOCK:
        checkpoints.save_figure(Path(run_dir) / "curves.png", plots.loss_accuracy_curves(
            history["train_loss"], history["train_acc"], history["test_loss"], history["test_acc"], title=title),
            tight=False)
        checkpoints.save_figure(Path(run_dir) / "misclassified.png", plots.show_misclassified(
            model, device, dataset, title=f"{title}: misclassified"))
