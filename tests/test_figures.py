"""Figures render off-screen (Agg) with the panels and titles a reader expects."""
import os
import subprocess
import sys

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch

from normstudy import data
from normstudy import models
import utils


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_backend_is_off_screen():
    assert matplotlib.get_backend().lower() == "agg"


def test_loss_and_accuracy_grid():
    fig = utils.printTrainTest_LossAcc([2.0, 1.5, 1.2], [30, 45, 55], [1.8, 1.4, 1.3], [35, 50, 52], title="BN")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Training loss", "Test loss", "Training accuracy (%)", "Test accuracy (%)"]
    assert list(fig.axes[3].lines[0].get_ydata()) == [35, 50, 52]
    fig.savefig(__import__("io").BytesIO(), format="png")


def test_misclassified_gallery_titles_true_and_predicted(dataset):
    model = models.CifarNet("ln").eval()
    fig = utils.show_misclassified(model, "cpu", dataset, title="LN")
    assert len(fig.axes) == 10
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert len(titles) == 10  # an untrained model gets at least 10 of 200 wrong
    for title in titles:
        true, predicted = title.split("\n")
        assert true.removeprefix("true: ") in data.CLASSES
        assert predicted.removeprefix("predicted: ") in data.CLASSES
        assert true.removeprefix("true: ") != predicted.removeprefix("predicted: ")
    # images are shown as stored (uint8, un-normalized)
    assert fig.axes[0].images[0].get_array().dtype == "uint8"


def test_find_misclassified_returns_only_mistakes(dataset):
    model = models.CifarNet("bn").eval()
    loader = data.DeviceLoader(dataset["test_images"], dataset["test_labels"], batch_size=64)
    index, truth, predicted = utils.find_misclassified(model, "cpu", loader, n=10)
    assert len(index) == 10 and (truth != predicted).all()
    assert torch.equal(truth, dataset["test_labels"][index])


def test_gallery_spans_the_classes_of_a_class_sorted_test_set():
    labels = torch.arange(10).repeat_interleave(20)  # sorted by class, like the rebuilt test batch
    images = torch.zeros(200, 3, 32, 32, dtype=torch.uint8)
    loader = data.DeviceLoader(images, labels, batch_size=64)

    class PredictsZero(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()

    index, truth, predicted = utils.find_misclassified(PredictsZero(), "cpu", loader, n=10)
    assert truth.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 1]  # one per wrong class, then round two
    assert index.tolist() == [20, 40, 60, 80, 100, 120, 140, 160, 180, 21]
    assert (predicted == 0).all()


def test_comparison_and_training_images(dataset):
    history = {"train_loss": [1.6, 1.2], "train_acc": [40, 60], "test_loss": [1.5, 1.1], "test_acc": [45, 62]}
    fig = utils.plot_comparison({"BN": history, "GN": history})
    assert [len(ax.lines) for ax in fig.axes] == [2, 2, 2, 2]
    fig = utils.show_images(dataset["train_images"], dataset["train_labels"], data.CLASSES, n=10)
    assert sum(1 for ax in fig.axes if ax.images) == 10


def test_figures_warm_up_in_a_fresh_process_loads_pyplot_and_shows_nothing():
    # In a fresh process (pytest has pyplot already): the thread imports pyplot and leaves no figure.
    code = ("from normstudy import plots; import sys; assert 'matplotlib.pyplot' not in sys.modules; "
            "thread = plots.warm_up_in_background(); thread.join(); import matplotlib.pyplot as plt; "
            "assert plt.get_fignums() == [], plt.get_fignums(); assert plots.warm_up_in_background() is None; "
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MPLBACKEND": "Agg"})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("figures", [True, False])
def test_a_run_warms_up_its_figures_once_set_up_only_when_it_draws_them(figures, tmp_path, monkeypatch):
    from normstudy import plots
    from normstudy import run as run_lib
    from normstudy.config import RunConfig
    calls = []
    monkeypatch.setattr(plots, "warm_up_in_background", lambda: calls.append("warm"))
    config = RunConfig(norm="bn", epochs=1, batch_size=256, data="synthetic")
    run_lib.run_one(config, tmp_path, device="cpu", figures=figures, progress=False, log=lambda line: None)
    assert calls == (["warm"] if figures else [])


def test_a_runs_curves_are_saved_in_one_rendering_and_its_gallery_keeps_a_long_title(dataset, tmp_path):
    # bbox_inches="tight" renders a figure twice (once to measure it): ~0.15 s of every run's end
    # for the curves, whose margins tight_layout has already taken away, so they are saved as laid
    # out (their PNG is the figure's size at 100 dpi). The 5-inch gallery keeps the crop: its title
    # can be wider than the figure (found in review: the longest run labels lost both ends).
    from PIL import Image
    from normstudy import run as run_lib
    from normstudy.config import RunConfig
    config = RunConfig(norm="gn", groups=16, order="norm-relu", batch_size=512, data="synthetic", epochs=2)
    history = {"train_loss": [2.0, 1.5], "train_acc": [30, 45], "test_loss": [1.8, 1.4], "test_acc": [35, 50]}
    record = {"config": config.to_dict(), "history": history}
    run_lib.write_run_figures(tmp_path, record, model=models.CifarNet("ln").eval(), device="cpu", dataset=dataset)
    assert Image.open(tmp_path / "curves.png").size == (1200, 800)
    width, _ = Image.open(tmp_path / "misclassified.png").size
    assert width > 500  # the crop widened the canvas to the whole title
