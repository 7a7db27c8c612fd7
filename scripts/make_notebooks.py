"""Write the top-level notebooks from their templates: the three variants' (they differ only in the
variant) and the study's (ERA_Session8_Norm_Study.ipynb: the tables and figures of the grids).

    python scripts/make_notebooks.py            # all four notebooks
    python scripts/make_notebooks.py study      # only the study's (names: bn ln gn study)

A notebook that already matches its template is left as it is, outputs included. Where the
template changed, the changed cells are written without outputs and every other cell keeps its
outputs; run `scripts/run_notebooks.py` on it afterwards for fresh ones.

tests/test_notebooks.py fails when a committed notebook's code differs from what this template makes.

The notebooks only orchestrate and show; all logic lives in the .py modules. Outputs come from
executing them (README: "Notebooks").
"""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "bn": ("ERA_Session8_Assignment_BN_v1.ipynb", "model_bn", "BatchNorm",
           "each channel normalized over the batch and the image (N, H, W)"),
    "ln": ("ERA_Session8_Assignment_LayerNorm_v1.ipynb", "model_ln", "LayerNorm",
           "each image normalized over all its channels and pixels (C, H, W): GroupNorm with 1 group"),
    "gn": ("ERA_Session8_Assignment_GroupNorm_v1.ipynb", "model_gn", "GroupNorm",
           "each image's channels split into 2 groups, each normalized over its channels and pixels"),
}


SETUP = """\
# In Colab: fetch this repository (or reuse the copy made before a runtime restart) and the one
# package Colab lacks. Elsewhere (a clone of the repository) this cell does nothing.
REPO_URL = 'https://github.com/<you>/<this-repo>.git'  #@param {type:"string"}
import os, subprocess, sys
if 'google.colab' in sys.modules and not os.path.isdir('normstudy'):
    if '<you>' in REPO_URL:
        raise SystemExit('Set REPO_URL (the form field of this cell) to your copy of this repository, then run the cell again.')
    if not os.path.isdir('/content/norm-study/.git'):
        subprocess.run(['git', 'clone', '--depth=1', REPO_URL, '/content/norm-study'], check=True)
    os.chdir('/content/norm-study')
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', 'torchsummary'], check=True)"""


def cells(norm, module, name, what):
    return [
        new_markdown_cell(
            f"# ERA Session 8: the 48,736-parameter CIFAR-10 CNN with {name}\n\n"
            f"{name}: {what}. The network, the recipe and the training loop live in the repository's "
            "package `normstudy/`; this notebook runs them and shows the results: the model summary, a "
            "few training images, 20 epochs of training, the loss and accuracy curves and ten "
            "misclassified test images.\n\n"
            "Run it on a GPU (Colab: Runtime > Change runtime type > GPU; in Colab, first set the "
            "repository's URL in the form of the next cell). With `SMOKE = True` (set automatically "
            "when the `CI` environment variable is set) it trains one epoch on tiny synthetic data "
            "instead, in under a minute on any machine, to check the machinery: its accuracy says nothing about CIFAR-10."),
        new_code_cell(SETUP),
        new_code_cell(
            "# Parameters\n"
            "SMOKE = bool(os.environ.get('CI'))  # tiny synthetic data and one epoch, for CI\n"
            "EPOCHS = 1 if SMOKE else 20\n"
            "SEED = 0\n"
            "DATA_DIR = './data'  # holds (or receives) cifar-10-batches-py/\n"
            "# Rerun the notebook to resume after an interruption; another EPOCHS or SEED starts its own file.\n"
            f"CHECKPOINT = None if SMOKE else f'checkpoints/{norm}-e{{EPOCHS}}-s{{SEED}}.pt'",
            metadata={"tags": ["parameters"]}),
        new_code_cell(
            "from torchsummary import summary\n\n"
            "import utils\n"
            "from normstudy import data, fit, runtime\n"
            "from normstudy.recipe import initialize, model_kwargs, recipe_for\n"
            f"from {module} import Net\n\n"
            "device = runtime.pick_device()\n"
            f"recipe = recipe_for('{norm}', epochs=EPOCHS)\n"
            "print('device:', device)\n"
            "print('recipe:', recipe)"),
        new_code_cell(
            "dataset = data.load_synthetic_cifar10() if SMOKE else data.load_cifar10(DATA_DIR)\n"
            "print({k: tuple(v.shape) for k, v in dataset.items() if k != 'classes'})"),
        new_code_cell(
            "fit.seed_everything(SEED)\n"
            "model = initialize(Net(**model_kwargs(recipe)), recipe, dataset['train_images'])  # whitened first conv\n"
            "summary(model, input_size=(3, 32, 32), device='cpu')"),
        new_markdown_cell("Ten training images as the network sees them: randomly cropped and flipped."),
        new_code_cell(
            "train_loader, _ = fit.make_loaders(dataset, recipe=recipe, device='cpu', seed=SEED)\n"
            "images, labels = train_loader.epoch_tensors()\n"
            "utils.show_images(images, labels, dataset['classes'], n=10);"),
        new_code_cell(
            "if CHECKPOINT:\n"
            "    os.makedirs(os.path.dirname(CHECKPOINT), exist_ok=True)\n"
            f"history = fit.fit(model, dataset, norm='{norm}', recipe=recipe, device=device, seed=SEED,\n"
            "                  checkpoint_path=CHECKPOINT, resume=bool(CHECKPOINT) and os.path.exists(CHECKPOINT))"),
        new_code_cell(
            "utils.printTrainTest_LossAcc(history['train_loss'], history['train_acc'],\n"
            f"                             history['test_loss'], history['test_acc'], title='{name}');"),
        new_code_cell(
            "last3 = history['test_acc'][-3:]\n"
            "print(f'train accuracy, last epoch: {history[\"train_acc\"][-1]:.2f} %')\n"
            "print(f'test accuracy, last 3 epochs: {last3} (mean {sum(last3) / len(last3):.2f} %)')\n"
            f"utils.show_misclassified(model, device, dataset, title='{name}: misclassified test images');"),
    ]


def notebook(norm):
    """The notebook of variant ``norm``, without outputs, as the template makes it."""
    filename, module, name, what = VARIANTS[norm]
    return new_notebook(cells=cells(norm, module, name, what), metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}, "accelerator": "GPU",
        "colab": {"provenance": []}})


STUDY = "ERA_Session8_Norm_Study.ipynb"


def study_cells():
    return [
        new_markdown_cell(
            "# ERA Session 8: the normalization study\n\n"
            "How the test error of the 48,736-parameter CIFAR-10 CNN depends on the batch size with BatchNorm, "
            "LayerNorm and GroupNorm, and GroupNorm's on its number of groups, after Wu & He, *Group "
            "Normalization* (2018), Tables 2 and 3. The runs are made by\n\n"
            "    python -m normstudy.study batch --out results/batch-size    # 3 norms x 9 batch sizes x 3 seeds\n"
            "    python -m normstudy.study groups --out results/groups       # G = 1..32 and BN, batch 512, 16 and 4\n\n"
            "(package `normstudy/`, module `study`); this notebook loads their summaries "
            "(`summary.json` in each folder) and shows the tables and figures. With `SMOKE = True` (set "
            "automatically when the `CI` environment variable is set) it instead runs a tiny grid in "
            "a minute on any machine, 2 norms x 2 batch sizes x 1 seed x 1 epoch on small synthetic data, "
            "and shows that: its accuracy says nothing about CIFAR-10."),
        new_code_cell(SETUP),
        new_code_cell(
            "# Parameters\n"
            "SMOKE = bool(os.environ.get('CI'))  # a tiny grid on synthetic data instead of the committed results\n"
            "BATCH_RESULTS = 'results/batch-size'  # python -m normstudy.study batch --out results/batch-size\n"
            "GROUPS_RESULTS = 'results/groups'  # python -m normstudy.study groups --out results/groups\n"
            "GHOST_RESULTS = 'results/ghost'  # part two (issue 20): normstudy study ghost --out results/ghost\n"
            "ORDER_RESULTS = 'results/order'  # normstudy study order --out results/order\n"
            "REMEDIES_RESULTS = 'results/remedies'  # normstudy study remedies --out results/remedies",
            metadata={"tags": ["parameters"]}),
        new_code_cell(
            "from IPython.display import Markdown, display\n\n"
            "from normstudy import plots, study, study_report\n\n"
            "if SMOKE:  # 2 norms x 2 batch sizes x 1 seed x 1 epoch on synthetic data, in a temporary folder\n"
            "    import tempfile\n"
            "    BATCH_RESULTS = GROUPS_RESULTS = tempfile.mkdtemp(prefix='norm-study-smoke-')\n"
            "    GHOST_RESULTS = ORDER_RESULTS = REMEDIES_RESULTS = tempfile.mkdtemp(prefix='norm-study-smoke-')  # not run\n"
            "    grid = study.batch_grid(norms=('bn', 'gn'), batch_sizes=(256, 512), seeds=(0,), epochs=1, data='synthetic')\n"
            "    study.run_grid(grid, BATCH_RESULTS, progress=False)\n"
            "batch = study_report.load_summary(BATCH_RESULTS)\n"
            "groups = study_report.load_summary(GROUPS_RESULTS)\n"
            "for name, folder, summary in (('batch', BATCH_RESULTS, batch), ('groups', GROUPS_RESULTS, groups)):\n"
            "    print(f'{folder}: ' + (study_report.status_line(summary) if summary else\n"
            "                           f'no summary.json yet; make it with: python -m normstudy.study {name} --out {folder}'))"),
        new_markdown_cell(
            "## Test error vs batch size (Table 2)\n\n"
            "Test error (%) = 100 − the mean test accuracy of the last 3 epochs, mean ± standard deviation over "
            "seeds. The learning rate follows the batch size (linear rule, `normstudy/recipe.py`). "
            "GN − BN: positive where GroupNorm errs more than BatchNorm."),
        new_code_cell(
            "if batch:\n"
            "    display(Markdown(study_report.batch_table(batch)))\n"
            "    plots.error_vs_batch(batch['cells'])"),
        new_markdown_cell("BatchNorm and GroupNorm during training at the smallest batch size: training and test "
                          "error per epoch, mean over seeds, ±1 standard deviation shaded."),
        new_code_cell(
            "if batch:\n"
            "    plots.bn_vs_gn_curves(batch['cells'])"),
        new_markdown_cell(
            "## Number of groups (Table 3)\n\n"
            "GroupNorm with G groups of 32/G channels each (every normalized layer has 32 channels): G=1 is "
            "LayerNorm, G=32 InstanceNorm; BatchNorm at the same batch size for reference (dashed). "
            "Δ vs best: each value minus the best of its row."),
        new_code_cell(
            "if groups:\n"
            "    display(Markdown(study_report.groups_table(groups)))\n"
            "    plots.accuracy_vs_groups(groups['cells'])"),
        new_markdown_cell(
            "## Part two: why BatchNorm fails at small batches, and what fixes it\n\n"
            "Three more grids (README, *The study, part two*), each with its table and its figure as the "
            "package draws it into the grid's folder; a grid not yet run says how to run it.\n\n"
            "- **Statistics or steps?** BatchNorm with its statistics over n images while the optimizer steps "
            "on batch 512, and with the optimizer at 8n (Wu & He's 8 GPUs of n images), beside the batch "
            "grid's BN (statistics and steps both at n).\n"
            "- **Block order:** every norm in the seed's Conv → ReLU → Norm and in ResNet's Conv → Norm → "
            "ReLU, at batch 512 and 16.\n"
            "- **Remedies:** BN + Batch Renormalization, LN and GN + Weight Standardization, at every batch "
            "size, dashed beside the batch grid's norms."),
        new_code_cell(
            "from IPython.display import Image\n\n"
            "QUESTIONS = (('ghost', GHOST_RESULTS, study_report.ghost_table, 'statistics_or_steps.png'),\n"
            "             ('order', ORDER_RESULTS, study_report.order_table, 'order_vs_groups.png'),\n"
            "             ('remedies', REMEDIES_RESULTS, study_report.batch_table, 'test_error_vs_batch.png'))\n"
            "for kind, folder, table, figure in QUESTIONS:\n"
            "    summary = study_report.load_summary(folder)\n"
            "    display(Markdown(f'### {kind}'))\n"
            "    if not summary or not summary['cells']:\n"
            "        print(f'{folder}: not run yet; make it with: normstudy study {kind} --out {folder}')\n"
            "        continue\n"
            "    print(f'{folder}: ' + study_report.status_line(summary))\n"
            "    display(Markdown(table(summary)))\n"
            "    if os.path.exists(f'{folder}/{figure}'):\n"
            "        display(Image(filename=f'{folder}/{figure}'))"),
    ]


def study_notebook():
    """The study's notebook, without outputs, as the template makes it."""
    return new_notebook(cells=study_cells(), metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}, "colab": {"provenance": []}})


def _merge_metadata(old, new):
    """``old`` updated with ``new``'s values, dict by dict: the template's keys win, and what an
    execution added (e.g. language_info's version) stays."""
    merged = dict(old)
    for key, value in new.items():
        merged[key] = _merge_metadata(old[key], value) if isinstance(value, dict) and isinstance(
            old.get(key), dict) else value
    return merged


def keep_outputs(new, old):
    """``new`` (the template's notebook) with what ``old`` (the one on disk) has beyond the template:
    each cell whose type and source are unchanged is taken from ``old`` whole (outputs, execution
    count, id), a changed cell keeps its place's id, and the notebook's metadata is merged. So
    regenerating never throws away the committed outputs of a cell the template did not change."""
    for index, cell in enumerate(new.cells):
        if index >= len(old.cells):
            break
        previous = old.cells[index]
        if (previous.cell_type, previous.source) == (cell.cell_type, cell.source):
            new.cells[index] = previous
        elif "id" in previous:
            cell.id = previous.id
    new.metadata = nbformat.from_dict(_merge_metadata(old.metadata, new.metadata))
    return new


def main(names=None, *, root=ROOT):
    names = names or [*VARIANTS, "study"]
    unknown = set(names) - {*VARIANTS, "study"}
    if unknown:
        raise SystemExit(f"unknown notebook(s): {', '.join(sorted(unknown))}; choose from bn ln gn study")
    for name in names:
        filename, nb = (STUDY, study_notebook()) if name == "study" else (VARIANTS[name][0], notebook(name))
        path = Path(root) / filename
        if path.exists():
            before = path.read_text(encoding="utf-8")
            nb = keep_outputs(nb, nbformat.reads(before, as_version=4))
            if nbformat.writes(nb) + "\n" == before:  # nbformat.write ends the file with a newline
                print("unchanged", filename)
                continue
        nbformat.write(nb, path)
        print("wrote", filename)


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
