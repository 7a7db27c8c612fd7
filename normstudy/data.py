"""CIFAR-10 held once as uint8 tensors on the training device, augmented there in whole batches.

- :func:`load_cifar10` reads an existing ``cifar-10-batches-py/`` folder directly (no md5 check:
  a lossless rebuild of the dataset reads like the original) and downloads it with torchvision
  only when the folder is absent.
- Batch files are pickles; they are read with an unpickler that only builds dicts, lists, strings
  and numpy arrays, so a tampered file cannot run code. Every defect (missing, truncated, wrong
  shapes, labels out of range) raises :class:`DatasetError` with a message that names the file.
- :class:`DeviceLoader` iterates over normalized float batches. Augmentation (random crop with
  zero padding, horizontal flip, optional cutout) runs on the device over a whole epoch at once:
  no PIL, no worker processes. Test loaders never augment.
- :func:`write_synthetic_cifar10` writes small learnable fake data in the same file format, for
  tests and smoke runs.
"""
import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{k}" for k in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and std of the 50,000 training images, in [0, 1] units.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
IMAGE_SHAPE = (3, 32, 32)


class DatasetError(ValueError):
    """The CIFAR-10 folder is missing, unreadable or malformed; the message says what to do."""


class _SafeUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR-10 batch holds: containers, strings, numbers and numpy arrays."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"), ("builtins", "bytearray"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")


def _unpickle(path):
    """The pickle at ``path``; a dict's keys as str whichever Python wrote it. The original release
    is Python 2's: its arrays' bytes are Python 2 str, which ``encoding="latin1"`` (torchvision's
    choice) decodes to a 30 MB str for numpy to encode back, 4-5x the time of ``encoding="bytes"``
    (0.07-0.13 s against 0.02-0.03 s a file on a 2-core CPU)."""
    try:
        with open(path, "rb") as f:
            record = _SafeUnpickler(f, encoding="bytes").load()
        if isinstance(record, dict):
            record = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in record.items()}
        return record
    except FileNotFoundError:
        raise DatasetError(f"{path}: file missing from the CIFAR-10 folder; delete {path.parent} "
                           "to download it again, or copy a complete cifar-10-batches-py there") from None
    except Exception as err:  # truncated, corrupt or tampered: all reported the same way
        raise DatasetError(f"{path}: corrupt or truncated CIFAR-10 batch file ({type(err).__name__}: "
                           f"{err}); delete {path.parent} to download it again") from None


def read_batch(path):
    """Read one batch file as ``(images uint8 (N, 3, 32, 32), labels int64 (N,))`` tensors."""
    data, labels = _read_arrays(path)
    return torch.from_numpy(data.reshape(-1, *IMAGE_SHAPE)), torch.from_numpy(labels)


def _read_arrays(path):
    """One batch file, checked, as NumPy arrays ``(data uint8 (N, 3072), labels int64 (N,))``:
    views of what the file unpickled to (writable, its own memory), so the caller copies once."""
    path = Path(path)
    record = _unpickle(path)
    if not isinstance(record, dict) or "data" not in record or "labels" not in record:
        raise DatasetError(f"{path}: not a CIFAR-10 batch (expected a dict with 'data' and 'labels')")
    data, labels = record["data"], record["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise DatasetError(f"{path}: 'data' must be a uint8 array of shape (N, 3072) (3x32x32 images), "
                           f"got {shape} {getattr(data, 'dtype', '')}".rstrip())
    labels = np.asarray(labels)
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: expected {len(data)} integer labels, got shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DatasetError(f"{path}: labels must lie in 0..{len(CLASSES) - 1}, "
                           f"found {labels.min()}..{labels.max()}")
    return data, labels.astype(np.int64)


def _download(data_dir):
    """Fetch and extract the dataset with torchvision (the only network access in the package)."""
    from torchvision.datasets import CIFAR10
    CIFAR10(root=str(data_dir), train=True, download=True)


def find_or_download(data_dir, *, download=True):
    """Return ``data_dir/cifar-10-batches-py``, downloading it only if the folder is absent."""
    folder = Path(data_dir) / FOLDER
    if folder.is_dir():
        return folder
    if not download:
        raise DatasetError(f"{folder} not found and downloading is off; put the extracted "
                           "cifar-10-batches-py folder there")
    try:
        _download(data_dir)
    except Exception as err:
        raise DatasetError(
            f"{folder} not found and the download failed ({type(err).__name__}: {err}). "
            "Without a network, copy the extracted 'CIFAR-10 python version' folder "
            f"cifar-10-batches-py into {Path(data_dir).resolve()} (or point --data-dir / DATA_DIR at it)") from None
    if not folder.is_dir():
        raise DatasetError(f"the download did not create {folder}")
    return folder


def load_cifar10(data_dir="./data", *, download=True):
    """Load CIFAR-10 as uint8 tensors: a dict with ``train_images``, ``train_labels``,
    ``test_images``, ``test_labels`` (CPU tensors) and ``classes``."""
    folder = find_or_download(data_dir, download=download)
    # One concatenation of the unpickled arrays, not a copy of each and a torch.cat of the copies:
    # 0.15 s in place of 0.4 s for the 150 MB of training images (2-core CPU, warm page cache).
    train = [_read_arrays(folder / name) for name in TRAIN_FILES]
    test_images, test_labels = read_batch(folder / TEST_FILE)
    return {
        "train_images": torch.from_numpy(np.concatenate([data for data, _ in train]).reshape(-1, *IMAGE_SHAPE)),
        "train_labels": torch.from_numpy(np.concatenate([labels for _, labels in train])),
        "test_images": test_images,
        "test_labels": test_labels,
        "classes": CLASSES,
    }


def fingerprint(dataset):
    """Sizes and a checksum of ``dataset``'s images and labels: what a checkpoint records, so that a
    run is never resumed on other data (another folder, synthetic data, another holdout)."""
    digest = hashlib.sha1()
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        tensor = dataset[key]
        digest.update(repr(tuple(tensor.shape)).encode())
        # Labels in full; images by a strided sample (hashing 150 MB would cost ~0.3 s a run).
        sample = tensor if key.endswith("labels") else tensor.reshape(len(tensor), -1)[:, ::97]
        digest.update(sample.contiguous().cpu().numpy().tobytes())
    return {"train": len(dataset["train_labels"]), "test": len(dataset["test_labels"]), "sha1": digest.hexdigest()}


def holdout_split(dataset, n, *, seed=0):
    """A copy of ``dataset`` whose "test" part is ``n`` training images held out (a fixed random
    choice per ``seed``) and whose training part is the rest: for choosing a recipe without
    looking at the test set."""
    total = len(dataset["train_labels"])
    if not 0 < n < total:
        raise ValueError(f"holdout={n} must be between 1 and {total - 1} (the training set has {total} images)")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    keep, held = order[:-n].sort().values, order[-n:].sort().values
    return {**dataset,
            "train_images": dataset["train_images"][keep], "train_labels": dataset["train_labels"][keep],
            "test_images": dataset["train_images"][held], "test_labels": dataset["train_labels"][held]}


# --- synthetic data in the CIFAR-10 file format -------------------------------------------------

class _Py2Pickler(pickle._Pickler):
    """Pickles as the original release was pickled (protocol 2, by Python 2): bytes, and so an
    array's data, as Python 2 str, so that synthetic files take the readers' real path."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        size = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([size]) if size < 256 else
                   pickle.BINSTRING + size.to_bytes(4, "little"))
        self.write(obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _write_pickle(path, record):
    """``record`` with its keys and strings as Python 2 str, as in the original release."""
    def py2(value):
        return value.encode("latin1") if isinstance(value, str) else value
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump({py2(key): [py2(v) for v in value] if isinstance(value, list) else py2(value)
                                         for key, value in record.items()})


def synthetic_images(n, *, seed=0):
    """``n`` learnable fake images: each class a fixed colour tint plus a class-placed bright square
    plus noise, so that a small CNN can tell them apart within an epoch or two."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), size=n)
    tints = np.random.default_rng(1234).integers(40, 215, size=(len(CLASSES), 3))
    images = rng.normal(0, 25, size=(n, 3, 32, 32)) + tints[labels][:, :, None, None]
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 5)
        images[i, :, 4 + 14 * r:12 + 14 * r, 1 + 6 * c:6 + 6 * c] += 80
    return np.clip(images, 0, 255).astype(np.uint8), labels


def write_synthetic_cifar10(data_dir, *, n_train=500, n_test=200, seed=0):
    """Write a small fake ``cifar-10-batches-py`` folder under ``data_dir``; return the folder."""
    folder = Path(data_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = synthetic_images(n_train + n_test, seed=seed)
    flat = images.reshape(len(images), -1)
    splits = np.array_split(np.arange(n_train), len(TRAIN_FILES))
    for name, idx in zip(TRAIN_FILES, splits):
        _write_pickle(folder / name, {"data": flat[idx], "labels": labels[idx].tolist(),
                                      "batch_label": name})
    test = np.arange(n_train, n_train + n_test)
    _write_pickle(folder / TEST_FILE, {"data": flat[test], "labels": labels[test].tolist(),
                                       "batch_label": TEST_FILE})
    _write_pickle(folder / META_FILE, {"label_names": list(CLASSES), "num_vis": 3072})
    return folder


def load_synthetic_cifar10(*, n_train=1024, n_test=256, seed=0):
    """Fake CIFAR-10 written to a temporary folder in the real format and read back through
    :func:`load_cifar10`, so smoke runs exercise the real loader. The folder is removed once read
    (the tensors are copies)."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="cifar10-synthetic-") as tmp:
        write_synthetic_cifar10(tmp, n_train=n_train, n_test=n_test, seed=seed)
        return load_cifar10(tmp, download=False)


# --- augmentation, on whole uint8 batches on any device -----------------------------------------

def random_crop(images, *, padding, generator=None):
    """Crop each image at a random offset from its zero-padded copy (torchvision's
    ``RandomCrop(32, padding)``), as two gathers over the whole batch."""
    if padding == 0:
        return images
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n, 1), device=images.device, generator=generator)
    rows = (dy + torch.arange(h, device=images.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * padding)
    cols = (dx + torch.arange(w, device=images.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_flip(images, *, generator=None):
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(len(images), device=images.device, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)


def cutout(images, *, size, generator=None):
    """Zero a ``size`` x ``size`` square at a random centre of each image (it may overhang)."""
    if size == 0:
        return images
    n, _, h, w = images.shape
    cy, cx = torch.randint(0, h, (2, n, 1), device=images.device, generator=generator)
    ys = torch.arange(h, device=images.device)
    xs = torch.arange(w, device=images.device)
    inside_y = ((ys - cy + size // 2) >= 0) & ((ys - cy + size // 2) < size)  # (n, h)
    inside_x = ((xs - cx + size // 2) >= 0) & ((xs - cx + size // 2) < size)  # (n, w)
    mask = inside_y[:, :, None] & inside_x[:, None, :]
    return images.masked_fill(mask[:, None], 0)


def augment(images, *, crop_padding=4, flip=True, cutout_size=0, generator=None):
    """Random crop, flip and cutout of a uint8 batch ``(N, 3, H, W)``; returns a new tensor."""
    images = random_crop(images, padding=crop_padding, generator=generator)
    if flip:
        images = random_flip(images, generator=generator)
    return cutout(images, size=cutout_size, generator=generator)


def channel_tensor(values, *, device="cpu", dtype=torch.float32):
    """Per-channel constants (e.g. :data:`MEAN`) as a ``(1, C, 1, 1)`` tensor on ``device``."""
    return torch.tensor(values, dtype=dtype).view(1, -1, 1, 1).to(device)


def normalize(images, *, mean=MEAN, std=STD, dtype=torch.float32):
    """uint8 ``(N, 3, H, W)`` -> float, scaled to [0, 1] then standardized per channel.

    ``mean`` and ``std`` may be tuples or :func:`channel_tensor` tensors already on the images'
    device; loaders pass tensors, because building them from tuples copies them to the GPU
    and waits for it on every call.
    """
    if not torch.is_tensor(mean):
        mean = channel_tensor(mean, device=images.device, dtype=dtype)
    if not torch.is_tensor(std):
        std = channel_tensor(std, device=images.device, dtype=dtype)
    return (images.to(dtype) / 255 - mean) / std


def test_loader(dataset, *, device="cpu", batch_size=None):
    """The test images of ``dataset`` in order, never augmented. Evaluation has no backward
    pass, so it takes large batches: all 10,000 at once on a GPU (fewer launches; 6.5 instead
    of 9-16 ms a test pass on the H100), 2,000 elsewhere (a CPU's memory)."""
    if batch_size is None:
        batch_size = 10_000 if torch.device(device).type == "cuda" else 2000
    return DeviceLoader(dataset["test_images"], dataset["test_labels"], batch_size=batch_size, device=device)


class DeviceLoader:
    """Batches of ``(normalized float images, labels)`` from uint8 images held on ``device``.

    With ``train=True`` every epoch reshuffles and re-augments all images in one pass on the
    device; otherwise images come in order and untouched. ``generator`` (a ``torch.Generator`` on
    ``device``) makes shuffling and augmentation reproducible and is part of a checkpoint.
    """

    def __init__(self, images, labels, *, batch_size=512, train=False, device="cpu",
                 augment_kwargs=None, generator=None):
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.augment_kwargs = dict(augment_kwargs or {})
        self.generator = generator
        self.mean = channel_tensor(MEAN, device=self.device)
        self.std = channel_tensor(STD, device=self.device)

    def __len__(self):
        return -(-len(self.images) // self.batch_size)

    def epoch_tensors(self):
        """The epoch's uint8 images and labels, shuffled and augmented when training."""
        if not self.train:
            return self.images, self.labels
        order = torch.randperm(len(self.images), device=self.device, generator=self.generator)
        images = augment(self.images[order], generator=self.generator, **self.augment_kwargs)
        return images, self.labels[order]

    def __iter__(self):
        images, labels = self.epoch_tensors()
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            yield normalize(images[start:stop], mean=self.mean, std=self.std), labels[start:stop]
