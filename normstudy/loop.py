"""The training and evaluation loops, in the plain style of pytorch/examples.

:func:`train` runs one epoch and :func:`test` one evaluation; each returns the epoch's mean loss
and accuracy, and the caller keeps the history (the seed kept it in module-level lists). The
loops keep their running sums on the device and read them back once per epoch (and when the
progress bar refreshes), so a fast GPU is never stalled by a per-batch ``.item()``.
"""
import sys
import time

import torch

if "IPython" in sys.modules:  # a notebook's kernel (or IPython's shell)
    try:  # tqdm.auto draws a widget in notebooks, and warns (TqdmWarning) where ipywidgets is missing
        import ipywidgets  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm
else:  # a script: tqdm.auto would choose the plain bar too, after importing ipywidgets (~0.1 s of every start)
    from tqdm import tqdm

from .divergence import NonFiniteLossError, NonFiniteStateError  # noqa: F401 - loop.NonFinite*: older callers' names
from .fast import steps

REFRESH_SECONDS = 0.5  # how often the progress bar's loss/accuracy is read back from the device


def GetCorrectPredCount(pPrediction, pLabels):
    """Number of rows of ``pPrediction`` (N, classes) whose arg-max equals ``pLabels`` (N,) or (N, 1)."""
    labels = pLabels.reshape(-1)
    if len(labels) != len(pPrediction):
        raise ValueError(f"{len(pPrediction)} predictions but {len(labels)} labels")
    return int(steps.correct_count(pPrediction, labels))


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
    if seen == 0:
        raise ValueError("train(): the loader gave no batches")
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
    if not outputs:
        raise ValueError("the loader gave no batches to evaluate")
    return torch.cat(outputs), torch.cat(targets)


def test(model, device, test_loader, criterion, *, tta_flip=False, amp_dtype=None):
    """Evaluate on ``test_loader``; returns ``(mean loss, accuracy in %)``."""
    logits, labels = predict(model, device, test_loader, tta_flip=tta_flip, amp_dtype=amp_dtype)
    loss = criterion(logits, labels).item()
    return loss, 100.0 * GetCorrectPredCount(logits, labels) / len(labels)
