"""The seed's notebook code runs unchanged against utils.py: ``train``/``test`` without a criterion,
the history in utils' module-level lists, the seed's test line, and the curves of those lists.
Tiny: a plain torch DataLoader over a few synthetic batches, on the CPU."""
import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import model_gn
import utils
from normstudy import data

# The seed's cells, as a student brings them (only the epoch count is smaller).
SEED_CELLS = """
from model_bn import Net
from utils import *
import torch.optim as optim

model = Net().to(device)
optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
EPOCHS = 2
for epoch in range(1, EPOCHS + 1):
    print(f'Epoch {epoch}')
    train(model, device, train_loader, optimizer)
    test(model, device, test_loader)

figure = printTrainTest_LossAcc(train_losses, train_acc, test_losses, test_acc)
"""


def tensor_loader(n, *, seed, batch_size=16):
    images, labels = data.synthetic_images(n, seed=seed)
    dataset = TensorDataset(data.normalize(torch.from_numpy(images)), torch.from_numpy(labels).long())
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def empty_history():
    """utils' lists emptied before and after, so other tests' calls do not show up in them."""
    lists = (utils.train_losses, utils.train_acc, utils.test_losses, utils.test_acc)
    for history in lists:
        history.clear()
    yield lists
    for history in lists:
        history.clear()


def test_the_seeds_notebook_cells_run_unchanged(empty_history, capsys):
    torch.manual_seed(0)
    notebook = {"device": "cpu", "train_loader": tensor_loader(64, seed=1), "test_loader": tensor_loader(32, seed=2)}
    exec(SEED_CELLS, notebook)  # a notebook's global namespace
    train_losses, train_acc, test_losses, test_acc = empty_history
    assert len(train_losses) == len(train_acc) == len(test_losses) == len(test_acc) == 2
    assert notebook["train_losses"] is train_losses and notebook["test_acc"] is test_acc
    assert all(0 < loss < 10 for loss in train_losses + test_losses)
    assert all(0 <= acc <= 100 for acc in train_acc + test_acc)
    lines = re.findall(r"Test set: Average loss: (\d+\.\d{4}), Accuracy: (\d+)/32 \((\d+\.\d{2})%\)",
                       capsys.readouterr().out)
    assert len(lines) == 2
    for (loss, correct, accuracy), logged_loss, logged_acc in zip(lines, test_losses, test_acc):
        assert float(loss) == pytest.approx(logged_loss, abs=1e-4)
        assert float(accuracy) == pytest.approx(100 * int(correct) / 32, abs=0.01) == pytest.approx(logged_acc, abs=0.01)
    assert len(notebook["figure"].axes) == 4
    notebook["figure"].clf()


def test_the_default_criterion_suits_log_probabilities_as_the_seeds_nll_loss_did(empty_history):
    # The seed's Net ended in log_softmax and its helpers used F.nll_loss.
    torch.manual_seed(0)
    model = nn.Sequential(model_gn.Net(), nn.LogSoftmax(dim=1))
    loader = tensor_loader(32, seed=3)
    utils.train(model, "cpu", loader, torch.optim.SGD(model.parameters(), lr=0.01), progress=False)
    loss, _ = utils.test(model, "cpu", loader)
    log_probabilities, labels = utils.predict(model, "cpu", loader)
    assert loss == pytest.approx(nn.functional.nll_loss(log_probabilities, labels).item(), rel=1e-5)
