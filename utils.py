"""The seed's helper names, kept for the notebooks and for students' own notebook cells:
:func:`GetCorrectPredCount`, :func:`train`, :func:`test` and :func:`printTrainTest_LossAcc`.

The seed's flow runs unchanged::

    from model_bn import Net
    from utils import *

    model = Net().to(device)
    for epoch in range(1, EPOCHS + 1):
        train(model, device, train_loader, optimizer)
        test(model, device, test_loader)
    printTrainTest_LossAcc(train_losses, train_acc, test_losses, test_acc)

As the seed's did, ``train`` and ``test`` append each epoch's mean loss and accuracy (%) to the
module-level lists ``train_losses``, ``train_acc``, ``test_losses`` and ``test_acc``; ``train``
shows a progress bar and ``test`` prints the seed's line ("Test set: Average loss: ..."). They
also return ``(mean loss, accuracy)``. The criterion is optional: cross-entropy by default, which
is right both for logits and for the seed's log-probabilities (its Net ended in ``log_softmax``,
and log_softmax of log-probabilities changes nothing, so cross-entropy equals its ``nll_loss``).

The loops themselves live in the package (:mod:`normstudy.loop`, which keeps no state, and
:mod:`normstudy.plots`); only the lists and the printing are this file's.
"""
from torch import nn

from normstudy import loop
from normstudy.loop import GetCorrectPredCount, NonFiniteLossError, predict
from normstudy.plots import find_misclassified, plot_comparison, plot_misclassified, show_images, show_misclassified
from normstudy.plots import loss_accuracy_curves as printTrainTest_LossAcc

__all__ = ["GetCorrectPredCount", "train", "test", "printTrainTest_LossAcc",
           "train_losses", "train_acc", "test_losses", "test_acc",
           "NonFiniteLossError", "predict", "find_misclassified", "plot_comparison", "plot_misclassified",
           "show_images", "show_misclassified"]

# The seed's history, one entry per call: appended to, never replaced, so the names that
# `from utils import *` bound in a notebook keep seeing it.
train_losses, train_acc, test_losses, test_acc = [], [], [], []


def _criterion_or_default(criterion):
    return nn.CrossEntropyLoss() if criterion is None else criterion


def train(model, device, train_loader, optimizer, criterion=None, scheduler=None, **options):
    """One epoch of :func:`normstudy.loop.train` (``options``: ``progress``, ``desc``, ``step``).
    Appends the epoch's mean loss and accuracy (%) to ``train_losses`` and ``train_acc`` and
    returns them."""
    loss, accuracy = loop.train(model, device, train_loader, optimizer, _criterion_or_default(criterion),
                                scheduler, **options)
    train_losses.append(loss)
    train_acc.append(accuracy)
    return loss, accuracy


def test(model, device, test_loader, criterion=None, **options):
    """Evaluate on ``test_loader`` (``options`` go to :func:`normstudy.loop.predict`), print the
    seed's line, append the mean loss and accuracy (%) to ``test_losses`` and ``test_acc`` and
    return them."""
    logits, labels = predict(model, device, test_loader, **options)
    loss = _criterion_or_default(criterion)(logits, labels).item()
    correct = GetCorrectPredCount(logits, labels)
    accuracy = 100.0 * correct / len(labels)
    print(f"Test set: Average loss: {loss:.4f}, Accuracy: {correct}/{len(labels)} ({accuracy:.2f}%)")
    test_losses.append(loss)
    test_acc.append(accuracy)
    return loss, accuracy
