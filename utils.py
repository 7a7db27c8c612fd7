"""Training and evaluation loops and the figures of the study.

The seed's public names are kept: :func:`GetCorrectPredCount`, :func:`train`, :func:`test` and
:func:`printTrainTest_LossAcc`. Unlike the seed, nothing lives in module-level lists: ``train``
and ``test`` return the epoch's mean loss and accuracy, and the caller keeps the history.

The loops keep their running sums on the device and read them back once per epoch (and when the
progress bar refreshes), so a fast GPU is never stalled by a per-batch ``.item()``.
"""
import time

import torch
from tqdm.auto import tqdm

import data
import steps

REFRESH_SECONDS = 0.5  # how often the progress bar's loss/accuracy is read back from the device


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; ``batch`` is the first such batch (0-based)."""

    def __init__(self, batch, epoch=None):
        self.batch, self.epoch = batch, epoch
        where = f"epoch {epoch}, batch {batch}" if epoch is not None else f"batch {batch}"
        super().__init__(f"loss is NaN or infinite at {where}; lower the learning rate")


def GetCorrectPredCount(pPrediction, pLabels):
    """Number of rows of ``pPrediction`` (N, classes) whose arg-max equals ``pLabels`` (N,)."""
    return int(steps.correct_count(pPrediction, pLabels))


def train(model, device, train_loader, optimizer, criterion, scheduler=None, *, progress=True,
          desc="train", step=None):
    """One epoch of training; steps ``scheduler`` after every batch when given.

    ``step`` runs one optimizer step (see :mod:`steps`); by default the plain eager one.

    Returns ``(mean loss, accuracy in %)`` over the epoch's images. Raises
    :class:`NonFiniteLossError` naming the first batch whose loss was NaN or infinite.
    """
    model.train()
    step = step or steps.EagerStep(model, optimizer, criterion)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    seen, last_refresh = 0, time.monotonic()
    bar = tqdm(train_loader, desc=desc, leave=False, disable=not progress)
    for batch, (images, labels) in enumerate(bar):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss, batch_correct = step(images, labels)
        if scheduler is not None:
            scheduler.step()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), batch, first_bad)
        loss_sum += loss * len(labels)
        correct += batch_correct
        seen += len(labels)
        if progress and time.monotonic() - last_refresh > REFRESH_SECONDS:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{100 * correct.item() / seen:.2f}%")
            last_refresh = time.monotonic()
    if first_bad.item() >= 0:
        raise NonFiniteLossError(first_bad.item())
    return loss_sum.item() / seen, 100.0 * correct.item() / seen


@torch.no_grad()
def predict(model, device, loader, *, tta_flip=False, amp_dtype=None):
    """Logits for every image of ``loader`` (in order), averaged with the mirrored image's
    logits when ``tta_flip``; returns ``(logits, labels)`` on ``device``."""
    model.eval()
    outputs, targets = [], []
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        with steps.autocast(torch.device(device).type, amp_dtype):
            logits = model(images).float()
            if tta_flip:
                logits = (logits + model(images.flip(3)).float()) / 2
        outputs.append(logits)
        targets.append(labels.to(device, non_blocking=True))
    return torch.cat(outputs), torch.cat(targets)


def test(model, device, test_loader, criterion, *, tta_flip=False, amp_dtype=None):
    """Evaluate on ``test_loader``; returns ``(mean loss, accuracy in %)``."""
    logits, labels = predict(model, device, test_loader, tta_flip=tta_flip, amp_dtype=amp_dtype)
    loss = criterion(logits, labels).item()
    return loss, 100.0 * GetCorrectPredCount(logits, labels) / len(labels)


# --- figures ------------------------------------------------------------------------------------

def printTrainTest_LossAcc(train_losses, train_acc, test_losses, test_acc, *, title=None):
    """Train and test loss and accuracy per epoch in a 2x2 grid; returns the figure."""
    import matplotlib.pyplot as plt  # imported on first use: it adds ~0.5 s to every start-up
    fig, axs = plt.subplots(2, 2, figsize=(12, 8))
    epochs = range(1, len(train_losses) + 1)
    panels = [(axs[0, 0], train_losses, "Training loss"), (axs[1, 0], train_acc, "Training accuracy (%)"),
              (axs[0, 1], test_losses, "Test loss"), (axs[1, 1], test_acc, "Test accuracy (%)")]
    for ax, values, name in panels:
        ax.plot(epochs, values, marker=".")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _image_grid(images, titles, *, rows, cols, figsize, title=None):
    """uint8 ``(3, H, W)`` images shown as stored, one per cell, row by row; empty cells hidden."""
    import matplotlib.pyplot as plt  # imported on first use: it adds ~0.5 s to every start-up
    fig, axs = plt.subplots(rows, cols, figsize=figsize, squeeze=False)
    for i, ax in enumerate(axs.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i].permute(1, 2, 0).cpu().numpy())
            ax.set_title(titles[i], fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_images(images, labels, classes, *, n=10, title=None):
    """The first ``n`` uint8 images with their class names, in a 2-row grid; returns the figure."""
    n = min(n, len(images))
    cols = -(-n // 2)
    return _image_grid(images[:n], [classes[int(label)] for label in labels[:n]], rows=2, cols=cols,
                       figsize=(2 * cols, 4.6), title=title)


def find_misclassified(model, device, loader, *, n=10):
    """Indices (into the loader's images), true labels and predictions of ``n`` misclassified
    images: the first mistake of each true class in turn, so the gallery spans the classes even
    when the test set is stored sorted by class."""
    logits, labels = predict(model, device, loader)
    predicted = logits.argmax(dim=1)
    wrong = (predicted != labels).nonzero().flatten().cpu()
    wrong_labels = labels.cpu()[wrong]
    # Rank each mistake within its class (0 = first of its class), then take rank 0s, rank 1s, ...
    rank = torch.zeros_like(wrong)
    for label in wrong_labels.unique():
        members = wrong_labels == label
        rank[members] = torch.arange(int(members.sum()))
    chosen = wrong[torch.argsort(rank * len(labels) + wrong)[:n]]
    return chosen, labels.cpu()[chosen], predicted.cpu()[chosen]


def plot_misclassified(images, true_labels, predicted, classes, *, title=None):
    """Misclassified uint8 images (as stored, so un-normalized) in a 5x2 grid titled
    ``true / predicted``; returns the figure."""
    titles = [f"true: {classes[int(t)]}\npredicted: {classes[int(p)]}" for t, p in zip(true_labels, predicted)]
    return _image_grid(images, titles, rows=5, cols=2, figsize=(5, 13), title=title)


def show_misclassified(model, device, dataset, *, n=10, title=None):
    """``n`` misclassified test images of ``dataset`` (as :func:`data.load_cifar10` returns it,
    chosen by :func:`find_misclassified`) in a 5x2 grid; returns the figure."""
    index, truth, predicted = find_misclassified(model, device, data.test_loader(dataset, device=device), n=n)
    return plot_misclassified(dataset["test_images"][index], truth, predicted, dataset["classes"], title=title)


def plot_comparison(histories, *, title="BatchNorm vs LayerNorm vs GroupNorm"):
    """Test accuracy, test loss and train accuracy per epoch of several runs, one line each.

    ``histories`` maps a label (e.g. ``"bn"``) to a history dict with ``train_acc``,
    ``test_loss`` and ``test_acc`` lists; returns the figure.
    """
    import matplotlib.pyplot as plt  # imported on first use: it adds ~0.5 s to every start-up
    fig, axs = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [("test_acc", "Test accuracy (%)"), ("test_loss", "Test loss"), ("train_acc", "Training accuracy (%)")]
    for ax, (key, name) in zip(axs, panels):
        for label, history in histories.items():
            ax.plot(range(1, len(history[key]) + 1), history[key], marker=".", label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
