"""Loading CIFAR-10 from its own file format, every malformed-input error, and augmentation."""
import os
import pickle

import numpy as np
import pytest
import torch

from normstudy import data


def _write(path, record):
    with open(path, "wb") as f:
        pickle.dump(record, f, protocol=2)


def test_synthetic_folder_round_trips(cifar_dir):
    loaded = data.load_cifar10(cifar_dir, download=False)
    images, labels = data.synthetic_images(700, seed=0)
    assert loaded["train_images"].dtype == torch.uint8
    assert loaded["train_images"].shape == (500, 3, 32, 32)
    assert loaded["test_images"].shape == (200, 3, 32, 32)
    assert torch.equal(loaded["train_images"], torch.from_numpy(images[:500]))
    assert torch.equal(loaded["test_labels"], torch.from_numpy(labels[500:]).long())
    assert loaded["classes"][3] == "cat"


@pytest.mark.parametrize("protocol", [2, 4])
def test_batches_pickled_by_python_3_load_as_the_originals_do(cifar_dir, protocol):
    """The original release is Python 2's pickles (read with encoding="bytes", its keys decoded);
    a folder another tool wrote with Python 3's pickle must load the same."""
    folder = cifar_dir / "cifar-10-batches-py"
    original = data.load_cifar10(cifar_dir, download=False)
    for name in (*data.TRAIN_FILES, data.TEST_FILE):
        with open(folder / name, "rb") as f:
            record = pickle.load(f, encoding="bytes")
        with open(folder / name, "wb") as f:
            pickle.dump({key.decode(): value for key, value in record.items()}, f, protocol=protocol)
    again = data.load_cifar10(cifar_dir, download=False)
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(again[key], original[key])


def test_existing_folder_is_read_without_download(cifar_dir):
    # the autouse fixture makes any download fail: loading must not try one
    assert len(data.load_cifar10(cifar_dir)["train_labels"]) == 500


def test_missing_folder_offline_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(data.DatasetError) as err:
        data.load_cifar10(tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "download failed" in message and "copy the extracted" in message


def test_missing_folder_with_download_off(tmp_path):
    with pytest.raises(data.DatasetError, match="not found and downloading is off"):
        data.load_cifar10(tmp_path, download=False)


def test_missing_batch_file(cifar_dir):
    os.remove(cifar_dir / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(data.DatasetError, match="data_batch_3: file missing"):
        data.load_cifar10(cifar_dir)


def test_truncated_batch_file(cifar_dir):
    path = cifar_dir / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(data.DatasetError, match="data_batch_2: corrupt or truncated"):
        data.load_cifar10(cifar_dir)


def test_garbage_batch_file(cifar_dir):
    (cifar_dir / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x00not a pickle at all")
    with pytest.raises(data.DatasetError, match="test_batch: corrupt or truncated"):
        data.load_cifar10(cifar_dir)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_batch_file_that_would_run_code_is_refused(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(cifar_dir / "cifar-10-batches-py" / "data_batch_1", {"data": _Exploit(), "labels": []})
    with pytest.raises(data.DatasetError, match="refusing to load posix.system|refusing to load os.system"):
        data.load_cifar10(cifar_dir)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("array, message", [
    (np.zeros((10, 3000), np.uint8), r"got \(10, 3000\)"),
    (np.zeros((10, 3072), np.float32), r"got \(10, 3072\) float32"),
    (np.zeros((10, 3, 32, 32), np.uint8), r"got \(10, 3, 32, 32\)"),
])
def test_wrong_image_shape_or_type(cifar_dir, array, message):
    _write(cifar_dir / "cifar-10-batches-py" / "data_batch_4", {"data": array, "labels": [0] * 10})
    with pytest.raises(data.DatasetError, match="data_batch_4: 'data' must be a uint8 array.*" + message):
        data.load_cifar10(cifar_dir)


@pytest.mark.parametrize("labels, message", [([0] * 9 + [10], r"0\.\.9, found 0\.\.10"),
                                             ([-1] + [0] * 9, r"found -1\.\.0"),
                                             ([0] * 9, "expected 10 integer labels")])
def test_labels_out_of_range_or_miscounted(cifar_dir, labels, message):
    _write(cifar_dir / "cifar-10-batches-py" / "test_batch",
           {"data": np.zeros((10, 3072), np.uint8), "labels": labels})
    with pytest.raises(data.DatasetError, match=message):
        data.load_cifar10(cifar_dir)


def test_not_a_batch_dict(cifar_dir):
    _write(cifar_dir / "cifar-10-batches-py" / "data_batch_5", [1, 2, 3])
    with pytest.raises(data.DatasetError, match="data_batch_5: not a CIFAR-10 batch"):
        data.load_cifar10(cifar_dir)


# --- augmentation -------------------------------------------------------------------------------

def _images(n=16, seed=0):
    return torch.randint(1, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_random_crop_is_a_shifted_copy_of_the_zero_padded_image():
    images = _images()
    crops = data.random_crop(images, padding=4, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    offsets = set()
    for image, crop in zip(padded, crops):
        matches = [(dy, dx) for dy in range(9) for dx in range(9)
                   if torch.equal(image[:, dy:dy + 32, dx:dx + 32], crop)]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 4  # offsets really vary across the batch


def test_random_crop_without_padding_is_identity():
    images = _images()
    assert torch.equal(data.random_crop(images, padding=0), images)


def test_random_flip_mirrors_about_half_the_images():
    images = _images(n=200)
    flipped = data.random_flip(images, generator=torch.Generator().manual_seed(2))
    mirrored = [torch.equal(f, i.flip(2)) for f, i in zip(flipped, images)]
    kept = [torch.equal(f, i) for f, i in zip(flipped, images)]
    assert all(m != k for m, k in zip(mirrored, kept))  # each image is exactly one of the two
    assert 60 < sum(mirrored) < 140


def test_cutout_zeroes_one_square_per_image():
    images = _images(n=8)
    out = data.cutout(images, size=8, generator=torch.Generator().manual_seed(3))
    zeroed = (out == 0).all(dim=1)  # pixels zero in every channel (inputs are never 0)
    assert all(0 < z.sum() <= 64 for z in zeroed)
    assert torch.equal(out[~(out == 0)], images[~(out == 0)])


def test_test_loader_is_ordered_and_never_augmented(dataset):
    loader = data.DeviceLoader(dataset["test_images"], dataset["test_labels"], batch_size=64)
    batches = list(loader)
    assert len(batches) == len(loader) == 4 and len(batches[-1][0]) == 200 - 3 * 64
    images = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(images, data.normalize(dataset["test_images"]))
    assert torch.equal(torch.cat([b[1] for b in batches]), dataset["test_labels"])


def test_train_loader_reshuffles_and_augments_each_epoch(dataset):
    loader = data.DeviceLoader(dataset["train_images"], dataset["train_labels"], batch_size=100, train=True,
                               augment_kwargs={"crop_padding": 4}, generator=torch.Generator().manual_seed(0))
    first, second = (torch.cat([labels for _, labels in loader]) for _ in range(2))
    assert not torch.equal(first, second)
    assert torch.equal(first.sort().values, dataset["train_labels"].sort().values)


def test_normalize_standardizes_per_channel():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = data.normalize(images, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    assert out[:, 0].eq(2.0).all() and out[:, 1].eq(1.0).all() and out[:, 2].eq(0.5).all()


def test_loader_rejects_bad_arguments(dataset):
    with pytest.raises(ValueError, match="batch_size=0 must be positive"):
        data.DeviceLoader(dataset["test_images"], dataset["test_labels"], batch_size=0)
    with pytest.raises(ValueError, match="uint8"):
        data.DeviceLoader(dataset["test_images"].float(), dataset["test_labels"])


def test_holdout_split_takes_validation_images_from_the_training_set(dataset):
    split = data.holdout_split(dataset, 100, seed=0)
    assert len(split["train_labels"]) == 400 and len(split["test_labels"]) == 100
    both = torch.cat([split["train_images"], split["test_images"]]).flatten(1)
    original = dataset["train_images"].flatten(1)
    assert sorted(map(bytes, both.numpy())) == sorted(map(bytes, original.numpy()))  # a partition
    assert torch.equal(data.holdout_split(dataset, 100, seed=0)["test_images"], split["test_images"])
    with pytest.raises(ValueError, match="holdout=500 must be between 1 and 499"):
        data.holdout_split(dataset, 500)
