"""The training recipe: one table of hyper-parameters, each with its unit, its type and its valid
range next to its value, and the optimizer, schedule and initialization built from it.

The learning rate follows a stated rule when the batch size changes (Wu & He, *Group
Normalization*, 2018): it is stored per 32 images and scales linearly with the batch,

    peak lr = lr_per_32 * batch_size / 32        (0.2 at the default batch of 512)

so ``--batch-size 8`` alone gives a sensible run (peak lr 0.003125). Weight decay, momentum and
the schedule's shape do not change with the batch.
"""
import math
from typing import NamedTuple

import torch

from .fast import optimizers


class Setting(NamedTuple):
    """One recipe value with what it may be: ``kind`` (int, float or bool) and, for numbers, the
    closed range ``low <= value <= high`` (``open_low``: strictly above ``low``)."""
    value: object
    kind: type
    low: float = None
    high: float = None
    open_low: bool = False


SETTINGS = dict(
    epochs=Setting(20, int, 1, 1000),                # passes over the 50,000 training images
    batch_size=Setting(512, int, 1, 50_000),         # images per optimizer step (the seed's)
    lr_per_32=Setting(0.0125, float, 0, 1e6, True),  # peak lr per 32 images of a batch (linear rule above)
    pct_start=Setting(0.25, float, 0, 1, True),      # fraction of all steps spent warming up to the peak
    div_factor=Setting(10.0, float, 1, 1e6),         # initial lr = peak lr / div_factor
    final_div_factor=Setting(100.0, float, 1, 1e6),  # final lr = initial lr / final_div_factor
    momentum=Setting(0.9, float, 0, 1, True),        # SGD Nesterov momentum (must be > 0 for Nesterov)
    weight_decay=Setting(5e-4, float, 0, 1),         # L2 on conv weights only; norm scales and shifts are not decayed
    label_smoothing=Setting(0.1, float, 0, 0.99),    # cross-entropy target smoothing (BatchNorm: 0, see NORM_OVERRIDES)
    dropout=Setting(0.0, float, 0, 0.99),            # after every norm layer
    bn_momentum=Setting(0.1, float, 0, 1),           # BatchNorm running-statistics update rate
    gn_groups=Setting(2, int, 1, 32),                # groups of the GroupNorm variant (the assignment's); divides 32
    crop_padding=Setting(2, int, 0, 16),             # pixels of zero padding around random 32x32 crops (4 over-regularizes 48k params)
    flip=Setting(True, bool),                        # random horizontal flips
    cutout=Setting(0, int, 0, 32),                   # side in pixels of a random zeroed square (0 = off)
    zero_init_residual=Setting(False, bool),         # start the residual branches' norm scales at 0 (branch = identity)
    whiten_init=Setting(True, bool),                 # first conv starts as a whitening of 3x3 patches (data-dependent)
)
RECIPE = {key: setting.value for key, setting in SETTINGS.items()}

# Where one norm is better served by other values, they are listed here (benchmarks/RECIPE_SEARCH.md
# has the runs behind each choice).
NORM_OVERRIDES = {
    "bn": {"label_smoothing": 0.0},  # 85.46 vs 85.07 % over 3 seeds; LN lost 2 points without it
    "ln": {},
    "gn": {},
}


def check_setting(key, value):
    """``value`` converted to the type of recipe ``key``; ``ValueError`` naming the key, the value
    and what is allowed when it is of the wrong type or out of range."""
    if key not in SETTINGS:
        raise ValueError(f"unknown recipe key {key!r}; choose one of {', '.join(SETTINGS)}")
    setting = SETTINGS[key]
    if setting.kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"recipe {key}={value!r}: expected true or false")
        return value
    # bool is an int in Python; a whole float (2.0) is accepted for an int, 1.5 is not.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"recipe {key}={value!r}: expected {'an integer' if setting.kind is int else 'a number'}")
    if setting.kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"recipe {key}={value!r}: expected an integer")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"recipe {key}={value!r}: expected a finite number")
    below = value <= setting.low if setting.open_low else value < setting.low
    if below or value > setting.high:
        opening = "(" if setting.open_low else "["
        raise ValueError(f"recipe {key}={value!r}: must lie in {opening}{setting.low}, {setting.high}]")
    return value


def recipe_for(norm, **overrides):
    """The default recipe for ``norm``, with ``overrides`` (checked, see :func:`check_setting`) on top."""
    if norm not in NORM_OVERRIDES:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORM_OVERRIDES)}")
    checked = {key: check_setting(key, value) for key, value in overrides.items()}
    return {**RECIPE, **NORM_OVERRIDES[norm], **checked}


def peak_lr(recipe):
    """The peak learning rate of ``recipe``'s batch size, by the linear rule (module docstring)."""
    return recipe["lr_per_32"] * recipe["batch_size"] / 32


def model_kwargs(recipe):
    """The recipe's network settings, as ``models.CifarNet`` and the ``model_*.Net`` take them."""
    return dict(groups=recipe["gn_groups"], dropout=recipe["dropout"], bn_momentum=recipe["bn_momentum"])


def make_optimizer(model, recipe):
    """SGD with Nesterov momentum; weight decay on conv weights (4-D), none on norm parameters.

    :class:`fast.optimizers.SGD` computes what ``torch.optim.SGD`` would, without the ~4.5 s that
    building a ``torch.optim`` optimizer costs at start-up (it imports ``torch._dynamo``)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": recipe["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    return optimizers.SGD(groups, lr=peak_lr(recipe), momentum=recipe["momentum"], nesterov=True)


def one_cycle(step, *, total_steps, pct_start, div_factor, final_div_factor):
    """The one-cycle learning rate at ``step``, as a fraction of the peak: linear from
    1/div_factor up to 1 until step ``pct_start * total_steps - 1``, then linear down to
    1/(div_factor * final_div_factor) at the last step. The same points as PyTorch's linear
    ``OneCycleLR``, which divides by zero on runs of a few steps (e.g. 2 epochs of 2 batches)."""
    start, end = 1 / div_factor, 1 / (div_factor * final_div_factor)
    peak_step, last_step = pct_start * total_steps - 1, total_steps - 1
    if step <= peak_step:
        return start + (1 - start) * (step / peak_step if peak_step > 0 else 1.0)
    # Past the last step (the scheduler's step after the final batch) it stays at the end value.
    return 1 + (end - 1) * (min(1.0, (step - peak_step) / (last_step - peak_step)) if last_step > peak_step else 1.0)


def make_scheduler(optimizer, recipe, *, steps_per_epoch):
    """The one-cycle schedule (:func:`one_cycle`), to be stepped once per batch."""
    total_steps = recipe["epochs"] * steps_per_epoch
    shape = dict(total_steps=total_steps, pct_start=recipe["pct_start"], div_factor=recipe["div_factor"],
                 final_div_factor=recipe["final_div_factor"])
    return optimizers.LambdaSchedule(optimizer, lambda step: one_cycle(step, **shape))


def whitening_filters(images, *, out_channels=32, eps=5e-4, samples=2000):
    """3x3 filters that whiten the patches of ``images`` (uint8, N x 3 x H x W): the top
    ``out_channels / 2`` eigenvectors of the patch covariance, scaled to unit output variance,
    and their negatives (the ReLU after the first conv would otherwise drop half the signal)."""
    from . import data as data_lib
    x = data_lib.normalize(images[:samples].cpu())
    patches = torch.nn.functional.unfold(x, kernel_size=3).transpose(1, 2).reshape(-1, 27)
    covariance = (patches.T @ patches).double() / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    top = eigenvectors[:, -(out_channels // 2):].T / (eigenvalues[-(out_channels // 2):, None] + eps).sqrt()
    return torch.cat([top, -top]).view(out_channels, 3, 3, 3).float()


def initialize(model, recipe, train_images):
    """Apply the recipe's initialization choices to a freshly built ``models.CifarNet``."""
    with torch.no_grad():
        if recipe["zero_init_residual"]:
            for block in (model.c2, model.c5):
                block[2].weight.zero_()
        if recipe["whiten_init"]:
            conv = model.c1[0]
            conv.weight.copy_(whitening_filters(train_images, out_channels=conv.out_channels))
    return model


def augment_kwargs(recipe):
    """The recipe's augmentation settings, as :func:`data.augment` takes them."""
    return dict(crop_padding=recipe["crop_padding"], flip=recipe["flip"], cutout_size=recipe["cutout"])
