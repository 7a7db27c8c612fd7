"""A run is a value: :class:`RunConfig` says everything that decides what a run computes.

Its :attr:`~RunConfig.run_id` (for example ``gn-g4-b32-e20-s0``) names the run's folder, so two
different configurations never share one; :meth:`~RunConfig.to_dict` / :meth:`~RunConfig.from_dict`
round-trip it through JSON (records, checkpoints, workers on other machines). How a run is
executed (device, mixed precision, kernels) is not part of it: see :mod:`normstudy.runtime`.

Four choices of issue 20 change the network itself (:data:`CHOICES`): the block ``order``, a
normalization batch ``norm_batch`` for BatchNorm (ghost batches), Batch Renormalization
(``renorm``) and Weight Standardization (``ws``). At their defaults they are left out of the id and
of :meth:`~RunConfig.to_dict`, so the runs, records and folders made before them are unchanged.
"""
import dataclasses
import re

from . import recipe as recipe_lib

NORMS = ("bn", "ln", "gn")  # in the order tables and figures list them
CHANNELS = 32  # channels of every normalized layer: GroupNorm's group count must divide it
NORM_NAMES = {"bn": "BatchNorm", "ln": "LayerNorm", "gn": "GroupNorm"}
DATASETS = ("cifar10", "synthetic")  # synthetic: small fake data in CIFAR-10's format, for smoke runs
# Fields of the config that are recipe keys; every other recipe key is an override.
_FIELD_KEYS = {"batch_size": "batch_size", "epochs": "epochs", "groups": "gn_groups"}
# Block orders: the seed's Conv -> ReLU -> Norm, and Conv -> Norm -> ReLU (Wu & He's ResNet).
ORDERS = ("relu-norm", "norm-relu")
# The network choices of issue 20 and their defaults (the seed's network); see RunConfig.
CHOICES = {"order": "relu-norm", "norm_batch": None, "renorm": False, "ws": False}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run. Fields left as ``None`` take the recipe's defaults when the config is
    built, so equal runs compare (and hash) equal however they were written.

    ``groups`` is GroupNorm's group count (LayerNorm is 1 group by definition; BatchNorm has
    none); ``overrides`` holds any other recipe values (``recipe.SETTINGS``) that differ from the
    norm's defaults; ``holdout`` scores the run on that many held-out training images instead of
    the test set (0: the test set).

    The network choices (:data:`CHOICES`; the fused Triton kernels implement none of them, so a
    run with one takes PyTorch's modules, see ``models.kernel_gaps``):
    ``order`` of each block, ``"relu-norm"`` (the seed's Conv -> ReLU -> Norm) or ``"norm-relu"``
    (Conv -> Norm -> ReLU); ``norm_batch`` n, BatchNorm only: training statistics over groups of n
    images of each batch (ghost batches; the optimizer still steps on the whole batch, evaluation
    uses the running statistics), n must divide the batch size (n equal to the batch is plain
    BatchNorm and is stored as ``None``; an epoch's last, smaller batch is cut into groups of n
    and its remainder normalized as one smaller group, see ``models.GhostBatchNorm2d``);
    ``renorm``, BatchNorm only: Batch Renormalization (Ioffe 2017) with the schedule of
    ``models.RENORM``; ``ws``: Weight Standardization (Qiao et al. 2019) of the convolutions a
    norm follows.
    """
    norm: str  # one of NORMS
    seed: int = 0
    batch_size: int | None = None  # None: the recipe's (always an int once built)
    epochs: int | None = None  # None: the recipe's (always an int once built)
    groups: int | None = None  # None: the recipe's for GroupNorm, 1 for LayerNorm, None for BatchNorm
    overrides: tuple[tuple[str, object], ...] = ()  # ((recipe key, value), ...), sorted once built
    data: str = "cifar10"  # one of DATASETS
    holdout: int = 0
    order: str = "relu-norm"  # one of ORDERS
    norm_batch: int | None = None  # BatchNorm's normalization batch n (ghost batches); None: the whole batch
    renorm: bool = False  # Batch Renormalization (BatchNorm only)
    ws: bool = False  # Weight Standardization of the convolutions a norm follows

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**32)")
        if self.data not in DATASETS:
            raise ValueError(f"data={self.data!r}: choose one of {', '.join(DATASETS)}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, int) or self.holdout < 0:
            raise ValueError(f"holdout={self.holdout!r} must be a whole number >= 0")
        overrides = dict(self.overrides)
        for field, key in _FIELD_KEYS.items():
            if key in overrides:
                if getattr(self, field) is not None and getattr(self, field) != overrides[key]:
                    raise ValueError(f"{key} given twice: {getattr(self, field)!r} and {overrides[key]!r}")
                object.__setattr__(self, field, overrides.pop(key))
        defaults = recipe_lib.recipe_for(self.norm)
        if self.norm != "gn" and self.groups is not None and self.groups != (1 if self.norm == "ln" else None):
            raise ValueError(f"groups={self.groups} applies to GroupNorm only, not to {self.norm}")
        for field, key in _FIELD_KEYS.items():
            value = getattr(self, field)
            value = defaults[key] if value is None else recipe_lib.check_setting(key, value)
            object.__setattr__(self, field, value)
        if self.norm != "gn":
            object.__setattr__(self, "groups", 1 if self.norm == "ln" else None)
        elif CHANNELS % self.groups:
            raise ValueError(f"GroupNorm groups={self.groups} must divide the {CHANNELS} channels of each "
                             "normalized layer: 1, 2, 4, 8, 16 or 32")
        checked = {key: recipe_lib.check_setting(key, value) for key, value in overrides.items()}
        object.__setattr__(self, "overrides", tuple(sorted(
            (key, value) for key, value in checked.items() if value != defaults[key])))
        self._check_choices()

    def _check_choices(self):
        """Refuse (one line) network choices that are not one of :data:`CHOICES`' values or do not
        apply to the norm; store a normalization batch equal to the batch as ``None`` (plain BN)."""
        if self.order not in ORDERS:
            raise ValueError(f"order={self.order!r}: choose relu-norm (the seed's Conv -> ReLU -> Norm) "
                             "or norm-relu (Conv -> Norm -> ReLU)")
        for name in ("renorm", "ws"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected true or false")
        if self.renorm and self.norm != "bn":
            raise ValueError(f"renorm (Batch Renormalization) applies to BatchNorm only, not to {self.norm}")
        n = self.norm_batch
        if n is None:
            return
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"norm_batch={n!r} must be a whole number >= 1 (images per BatchNorm statistic)")
        if self.norm != "bn":
            raise ValueError(f"norm_batch (ghost batches) applies to BatchNorm only, not to {self.norm}")
        if self.batch_size % n:
            raise ValueError(f"norm_batch={n} must divide the batch size {self.batch_size}")
        if n == self.batch_size:
            object.__setattr__(self, "norm_batch", None)  # statistics over the whole batch: plain BatchNorm
        elif self.renorm:
            raise ValueError("norm_batch and renorm do not combine: choose ghost batches or Batch Renormalization")

    @property
    def choices(self):
        """The network choices that differ from the seed's network (:data:`CHOICES`), e.g.
        ``{"order": "norm-relu"}``; ``{}`` for the seed's."""
        return {name: getattr(self, name) for name, default in CHOICES.items() if getattr(self, name) != default}

    @property
    def recipe(self):
        """The full recipe of this run: the norm's defaults, the fields and the overrides."""
        fields = {"batch_size": self.batch_size, "epochs": self.epochs}
        if self.norm == "gn":
            fields["gn_groups"] = self.groups
        return recipe_lib.recipe_for(self.norm, **fields, **dict(self.overrides))

    @property
    def run_id(self):
        """A readable name, unique per configuration: norm, groups (GN), batch, epochs, seed, then
        any overrides and the data, e.g. ``gn-g4-b32-e20-s0`` or ``bn-b512-e1-s0-synthetic``."""
        return self._name(seed=True)

    @property
    def cell(self):
        """The run id without the seed: runs that differ only by seed are averaged together."""
        return self._name(seed=False)

    def _name(self, *, seed):
        parts = [self.norm] + ([f"g{self.groups}"] if self.norm == "gn" else [])
        # The network choices, only where they differ from the seed's: normrelu, ws, renorm, ghost16
        parts += (["normrelu"] if self.order == "norm-relu" else []) + (["ws"] if self.ws else [])
        parts += (["renorm"] if self.renorm else []) + ([f"ghost{self.norm_batch}"] if self.norm_batch else [])
        parts += [f"b{self.batch_size}", f"e{self.epochs}"] + ([f"s{self.seed}"] if seed else [])
        # cutout8, flipoff; lr_per_32_0.02 (a key ending in a digit is kept apart from its value)
        parts += [f"{key}{'_' if key[-1].isdigit() else ''}{_id_value(value)}" for key, value in self.overrides]
        if self.data != "cifar10":
            parts.append(self.data)
        if self.holdout:
            parts.append(f"holdout{self.holdout}")
        return "-".join(parts)

    @property
    def label(self):
        """A human name for tables and legends, e.g. ``GroupNorm (4 groups)`` or ``BatchNorm,
        statistics over 16 images``."""
        if self.norm == "gn":
            name = f"GroupNorm ({self.groups} group{'s' if self.groups > 1 else ''})"
        else:
            name = {"bn": "BatchNorm", "ln": "LayerNorm (GN, 1 group)"}[self.norm]
        return name + "".join(choice_words(self.choices))

    def to_dict(self):
        """Plain JSON-able data; :meth:`from_dict` gives back an equal config. The network choices
        appear only where they differ from the seed's (so earlier records read the same)."""
        out = dataclasses.asdict(self)
        out["overrides"] = dict(self.overrides)
        for name, default in CHOICES.items():
            if out[name] == default:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, values):
        values = dict(values)
        unknown = set(values) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown run configuration keys: {', '.join(sorted(unknown))}")
        if isinstance(values.get("overrides"), dict):
            values["overrides"] = tuple(values["overrides"].items())
        return cls(**values)

    def differences(self, other):
        """``["field: mine vs theirs", ...]`` for every field where ``other`` differs."""
        mine, theirs = dataclasses.asdict(self), dataclasses.asdict(other)
        return [f"{key}: {theirs[key]!r} vs {mine[key]!r}" for key in mine if mine[key] != theirs[key]]


def choice_words(choices):
    """Words for the network choices ``choices`` (:attr:`RunConfig.choices`), each starting with
    ", " or " + ", e.g. ``[" + Batch Renorm"]``: what labels and legends append to a norm's name."""
    words = {"order": lambda v: ", Conv→Norm→ReLU" if v == "norm-relu" else ", Conv→ReLU→Norm",
             "norm_batch": lambda v: f", statistics over {v} images",
             "renorm": lambda v: " + Batch Renorm", "ws": lambda v: " + WS"}
    return [words[name](value) for name, value in choices.items() if value != CHOICES[name]]


def _id_value(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value)
    if isinstance(value, float):  # short (0.02, 1e-05), but exact: 6 digits would give two values one folder
        text = f"{value:g}" if float(f"{value:g}") == value else repr(value)
    return re.sub(r"[^A-Za-z0-9.]", "_", text)
