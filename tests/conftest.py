"""Shared fixtures: small synthetic CIFAR-10 folders in the real file format, and no models."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")  # figures render off-screen

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton's kernels (kernels.py) run in its CPU interpreter. Triton reads this when it is
    # first imported, so it is set before any test imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from normstudy import data  # noqa: E402

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
