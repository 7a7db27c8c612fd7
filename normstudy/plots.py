"""The figures of the study, as functions that return a matplotlib figure (nothing is shown or
saved here: notebooks display them, :func:`checkpoints.save_figure` writes them).

matplotlib is imported on first use: a training run draws nothing until it ends, and the import
adds ~0.5 s to every start-up. :func:`warm_up_in_background` pays that import, and the first
figure's font loading, on a thread while the GPU trains, so a run's figures cost only their drawing.
"""
import functools
import io
import sys
import threading

import torch

from . import data as data_lib
from . import loop
from .config import CHOICES

# pyplot keeps process-wide state and is not thread-safe: runs that train in threads of one process
# (the study's concurrent runs, a Ray worker's) draw their figures one at a time under this lock.
FIGURE_LOCK = threading.Lock()


@functools.cache  # once a process: what it loads stays loaded
def warm_up():
    """Import pyplot and render one throw-away figure with text (fonts, glyph caches, Agg): the
    fixed cost of a process's first figure (~1-2 s), paid once. The figure is not pyplot's
    (nothing to show or close in a notebook)."""
    import matplotlib.pyplot  # noqa: F401  (the import is the point: the figures use pyplot)
    from matplotlib.figure import Figure
    fig = Figure(figsize=(2, 1))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], marker=".")
    ax.set_title("warm-up")
    fig.tight_layout()
    with FIGURE_LOCK:
        fig.savefig(io.BytesIO(), format="png", dpi=100, bbox_inches="tight")


def warm_up_in_background():
    """:func:`warm_up` on a daemon thread: call it when the GPU starts training, whose epochs leave
    the CPU waiting (PyTorch releases the GIL while it waits). Returns the thread, or ``None`` where
    pyplot is loaded already (a notebook's kernel: nothing to gain, and its display hooks are left
    to its own thread)."""
    if "matplotlib.pyplot" in sys.modules:
        return None
    thread = threading.Thread(target=warm_up, name="figures-warm-up", daemon=True)
    thread.start()
    return thread


def loss_accuracy_curves(train_losses, train_acc, test_losses, test_acc, *, title=None):
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
    logits, labels = loop.predict(model, device, loader)
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
    index, truth, predicted = find_misclassified(model, device, data_lib.test_loader(dataset, device=device), n=n)
    return plot_misclassified(dataset["test_images"][index], truth, predicted, dataset["classes"], title=title)


def plot_comparison(histories, *, title="BatchNorm vs LayerNorm vs GroupNorm"):
    """Test accuracy, test loss, training accuracy and training loss per epoch of several runs,
    one line each.

    ``histories`` maps a label (e.g. ``"BN"``) to a history dict with ``train_loss``,
    ``train_acc``, ``test_loss`` and ``test_acc`` lists; returns the figure.
    """
    import matplotlib.pyplot as plt  # imported on first use: it adds ~0.5 s to every start-up
    fig, axs = plt.subplots(2, 2, figsize=(13, 8))
    panels = [("test_acc", "Test accuracy (%)"), ("test_loss", "Test loss"), ("train_acc", "Training accuracy (%)"),
              ("train_loss", "Training loss")]
    for ax, (key, name) in zip(axs.flat, panels):
        for label, history in histories.items():
            ax.plot(range(1, len(history[key]) + 1), history[key], marker=".", label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- the study's figures, from the cells of a grid summary (normstudy.study_report) -------------

def _log2_batch_axis(ax, values, label):
    ax.set_xscale("log", base=2)
    ax.set_xticks(values)
    ax.set_xticklabels([str(v) for v in values])
    ax.minorticks_off()
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)


def _variant_key(cell):
    return {"bn": 0, "ln": 1, "gn": 2}[cell["norm"]], cell["groups"] or 0


def error_vs_batch(cells, *, metric="test_error_last3_mean", title="Test error vs batch size"):
    """Test error against the batch size (log2 axis): one line per variant (norm and groups),
    shaded ±1 standard deviation over seeds. ``cells``: a grid summary's ``cells``."""
    import matplotlib.pyplot as plt  # imported on first use: it adds ~0.5 s to every start-up
    fig, ax = plt.subplots(figsize=(8, 5))
    variants = {}
    for cell in sorted(cells, key=lambda c: (_variant_key(c), any(key in c for key in CHOICES), c["batch_size"])):
        variants.setdefault(cell["variant"], []).append(cell)
    for name, row in variants.items():
        xs = [c["batch_size"] for c in row]
        means = [c[metric]["mean"] for c in row]
        stds = [c[metric]["std"] for c in row]
        remedy = any(key in row[0] for key in CHOICES)  # a norm with a network choice: dashed
        line, = ax.plot(xs, means, marker="o", label=name, linestyle="--" if remedy else "-")
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    _log2_batch_axis(ax, sorted({c["batch_size"] for c in cells}), "batch size (images per step)")
    ax.set_ylabel("test error (%)" if "error" in metric else "test accuracy (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def accuracy_vs_groups(cells, *, metric="test_acc_last3_mean", title="Test accuracy vs number of groups"):
    """GroupNorm's test accuracy against its number of groups G (log2 axis; 32/G channels per
    group), one line per batch size, shaded ±1 standard deviation; BatchNorm at the same batch
    size as a dashed horizontal line of the same colour."""
    import matplotlib.pyplot as plt  # imported on first use: it adds ~0.5 s to every start-up
    fig, ax = plt.subplots(figsize=(8, 5))
    for batch in sorted({c["batch_size"] for c in cells}, reverse=True):
        gn = sorted((c for c in cells if c["norm"] == "gn" and c["batch_size"] == batch), key=lambda c: c["groups"])
        bn = [c for c in cells if c["norm"] == "bn" and c["batch_size"] == batch]
        color = None
        if gn:
            xs = [c["groups"] for c in gn]
            means = [c[metric]["mean"] for c in gn]
            stds = [c[metric]["std"] for c in gn]
            line, = ax.plot(xs, means, marker="o", label=f"GN, batch {batch}")
            color = line.get_color()
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=color, alpha=0.2, linewidth=0)
        if bn:
            kwargs = {"color": color} if color else {}
            ax.axhline(bn[0][metric]["mean"], linestyle="--", label=f"BN, batch {batch}", **kwargs)
    groups = sorted({c["groups"] for c in cells if c["norm"] == "gn"})
    _log2_batch_axis(ax, groups or [1], "groups G (channels per group = 32 / G)")
    ax.set_xticklabels([f"{g}\n({32 // g} ch)" for g in groups or [1]])
    ax.set_ylabel("test accuracy (%)" if "acc" in metric else "test error (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def bn_vs_gn_curves(cells, *, batch_size=None, title=None):
    """Training and test error per epoch of BatchNorm and GroupNorm at ``batch_size`` (default:
    the smallest batch size that has both), mean over seeds with ±1 standard deviation shaded;
    two panels, one line per variant in each."""
    import matplotlib.pyplot as plt  # imported on first use: it adds ~0.5 s to every start-up
    from matplotlib.ticker import MaxNLocator
    if batch_size is None:
        both = sorted({c["batch_size"] for c in cells if c["norm"] == "bn"}
                      & {c["batch_size"] for c in cells if c["norm"] == "gn"})
        if not both:
            raise ValueError("no batch size has both BatchNorm and GroupNorm runs")
        batch_size = both[0]
    chosen = sorted((c for c in cells if c["batch_size"] == batch_size and c["norm"] in ("bn", "gn")),
                    key=_variant_key)
    fig, axs = plt.subplots(1, 2, figsize=(13, 4.5), sharey=False)
    for ax, key, name in zip(axs, ("train_error", "test_error"), ("Training error (%)", "Test error (%)")):
        for cell in chosen:
            curve = cell["curves"][key]
            epochs = range(1, len(curve["mean"]) + 1)
            line, = ax.plot(epochs, curve["mean"], marker=".", label=cell["variant"])
            ax.fill_between(epochs, [m - s for m, s in zip(curve["mean"], curve["std"])],
                            [m + s for m, s in zip(curve["mean"], curve["std"])],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or f"BatchNorm vs GroupNorm at batch size {batch_size}")
    fig.tight_layout()
    return fig


def _line_with_spread(ax, xs, row, metric, **style):
    """One line of means with ±1 standard deviation shaded; returns the line."""
    means = [c[metric]["mean"] for c in row]
    stds = [c[metric]["std"] for c in row]
    line, = ax.plot(xs, means, marker="o", **style)
    ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                    color=line.get_color(), alpha=0.2, linewidth=0)
    return line


GHOST_CURVES = {"grid": "batch n: statistics and steps (the batch-size grid)",
                "statistics": "statistics over n, optimizer batch {batch} (statistics only)",
                "gpus": "statistics over n, optimizer batch 8n (Wu & He's 8 GPUs)"}


def error_vs_norm_batch(cells, *, arrangement, metric="test_error_last3_mean",
                        title="BatchNorm: statistics or steps?"):
    """BatchNorm's test error against n, the images each statistic comes from (log2 axis), one
    line per arrangement (``arrangement(cell)``: "grid", "gpus", "statistics", or None to leave
    the cell out): plain BN at batch n, statistics over n at a fixed optimizer batch, and
    statistics over n at batch 8n; shaded ±1 standard deviation over seeds."""
    import matplotlib.pyplot as plt  # imported on first use: it adds ~0.5 s to every start-up
    fig, ax = plt.subplots(figsize=(8, 5))
    lines = {}
    for cell in cells:
        kind = arrangement(cell)
        if kind is not None:
            key = (kind, cell["batch_size"] if kind == "statistics" else None)
            lines.setdefault(key, []).append(cell)
    order = {"grid": 0, "statistics": 1, "gpus": 2}
    for (kind, batch), row in sorted(lines.items(), key=lambda item: (order[item[0][0]], item[0][1] or 0)):
        row = sorted(row, key=lambda c: c.get("norm_batch") or c["batch_size"])
        xs = [c.get("norm_batch") or c["batch_size"] for c in row]
        _line_with_spread(ax, xs, row, metric, label=GHOST_CURVES[kind].format(batch=batch),
                          linestyle="-" if kind == "grid" else "--")
    ns = sorted({c.get("norm_batch") or c["batch_size"] for row in lines.values() for c in row})
    _log2_batch_axis(ax, ns or [1], "n: images per BatchNorm statistic")
    ax.set_ylabel("test error (%)" if "error" in metric else "test accuracy (%)")
    ax.set_title(title)
    if lines:
        ax.legend()
    fig.tight_layout()
    return fig


ORDER_NAMES = {"relu-norm": "Conv→ReLU→Norm", "norm-relu": "Conv→Norm→ReLU"}


def error_vs_groups_by_order(cells, *, metric="test_error_last3_mean", title="Block order: test error vs groups"):
    """The block-order question: one panel per batch size (largest first), GroupNorm's test error
    against its number of groups G (log2 axis) in each block order (solid: the seed's Conv ->
    ReLU -> Norm; dashed: Conv -> Norm -> ReLU), ±1 standard deviation shaded, and BatchNorm in
    each order as a horizontal line of its colour."""
    import matplotlib.pyplot as plt  # imported on first use: it adds ~0.5 s to every start-up
    batches = sorted({c["batch_size"] for c in cells}, reverse=True) or [None]
    fig, axs = plt.subplots(1, len(batches), figsize=(7 * len(batches), 5), squeeze=False)
    groups = sorted({c["groups"] for c in cells if c["norm"] == "gn"}) or [1]
    for ax, batch in zip(axs.flat, batches):
        for order, name in ORDER_NAMES.items():
            style = {"linestyle": "-" if order == "relu-norm" else "--"}
            mine = [c for c in cells if c["batch_size"] == batch and c.get("order", "relu-norm") == order]
            gn = sorted((c for c in mine if c["norm"] == "gn"), key=lambda c: c["groups"])
            color = None
            if gn:
                color = _line_with_spread(ax, [c["groups"] for c in gn], gn, metric, label=f"GN, {name}",
                                          **style).get_color()
            for cell in (c for c in mine if c["norm"] == "bn"):
                ax.axhline(cell[metric]["mean"], label=f"BN, {name}", **style, **({"color": color} if color else {}))
        _log2_batch_axis(ax, groups, "groups G (channels per group = 32 / G)")
        ax.set_xticklabels([f"{g}\n({32 // g} ch)" for g in groups])
        ax.set_ylabel("test error (%)" if "error" in metric else "test accuracy (%)")
        ax.set_title(f"batch {batch}")
        if ax.lines:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
