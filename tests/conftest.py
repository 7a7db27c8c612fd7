"""Shared fixtures: small synthetic CIFAR-10 folders in the real file format, and no models."""
import json
import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")  # figures render off-screen

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton's kernels (kernels.py) run in its CPU interpreter. Triton reads this when it is
    # first imported, so it is set before any test imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from normstudy import data  # noqa: E402
from normstudy import run as run_lib  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def call_main(main, argv, capsys):
    """A command's ``main(argv)`` in-process: returns (exit code, stdout, stderr), argparse's and
    SIGTERM's SystemExit included."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """Tests never touch the network: any attempt to download the dataset fails loudly."""
    def refuse(data_dir):
        raise OSError("network disabled in tests")
    monkeypatch.setattr(data, "_download", refuse)


@pytest.fixture
def cifar_dir(tmp_path):
    """A data directory holding a small synthetic cifar-10-batches-py/ (500 train, 200 test)."""
    data.write_synthetic_cifar10(tmp_path, n_train=500, n_test=200)
    return tmp_path


@pytest.fixture
def dataset(cifar_dir):
    return data.load_cifar10(cifar_dir, download=False)


def fake_record(config, acc=50.0):
    """A finished run's record as ``run._train`` writes it (every key a record has), without training."""
    n = config.epochs
    history = {"train_loss": [1.0] * n, "train_acc": [acc] * n, "test_loss": [1.0] * n, "test_acc": [acc] * n,
               "lr": [0.1] * n, "epoch_seconds": [1.0] * n}
    return {"id": config.run_id, "config": config.to_dict(), "recipe": config.recipe, "device": "cpu",
            "params": 48_736, "final": {**run_lib.summary_figures(history), "test_acc_tta_flip": acc},
            "history": history, "seconds": 1.0}


def write_fake_record(out, config, acc=50.0):
    """``out/<run id>/record.json`` holding :func:`fake_record`, as a finished run leaves it; returns the record."""
    record = fake_record(config, acc)
    run_dir = Path(out) / config.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "record.json").write_text(json.dumps(record))
    return record
