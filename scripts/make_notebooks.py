"""Write the three top-level notebooks from one template (they differ only in the variant).

    python scripts/make_notebooks.py            # rewrites ERA_Session8_Assignment_*_v1.ipynb, no outputs

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
            "instead, in seconds, on any machine: its accuracy is at chance level, on purpose."),
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


def main():
    for norm, (filename, *_) in VARIANTS.items():
        nbformat.write(notebook(norm), ROOT / filename)
        print("wrote", filename)


if __name__ == "__main__":
    main()
