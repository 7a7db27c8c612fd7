"""A run is a value: :class:`RunConfig` says everything that decides what a run computes.

Its :attr:`~RunConfig.run_id` (for example ``gn-g4-b32-e20-s0``) names the run's folder, so two
different configurations never share one; :meth:`~RunConfig.to_dict` / :meth:`~RunConfig.from_dict`
round-trip it through JSON (records, checkpoints, workers on other machines). How a run is
executed (device, mixed precision, kernels) is not part of it: see :mod:`normstudy.runtime`.
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


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run. Fields left as ``None`` take the recipe's defaults when the config is
    built, so equal runs compare (and hash) equal however they were written.

    ``groups`` is GroupNorm's group count (LayerNorm is 1 group by definition; BatchNorm has
    none); ``overrides`` holds any other recipe values (``recipe.SETTINGS``) that differ from the
    norm's defaults; ``holdout`` scores the run on that many held-out training images instead of
    the test set (0: the test set).
    """
    norm: str  # one of NORMS
    seed: int = 0
    batch_size: int | None = None  # None: the recipe's (always an int once built)
    epochs: int | None = None  # None: the recipe's (always an int once built)
    groups: int | None = None  # None: the recipe's for GroupNorm, 1 for LayerNorm, None for BatchNorm
    overrides: tuple[tuple[str, object], ...] = ()  # ((recipe key, value), ...), sorted once built
    data: str = "cifar10"  # one of DATASETS
    holdout: int = 0

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
        """A human name for tables and legends, e.g. ``GroupNorm (4 groups)``."""
        if self.norm == "gn":
            return f"GroupNorm ({self.groups} group{'s' if self.groups > 1 else ''})"
        return {"bn": "BatchNorm", "ln": "LayerNorm (GN, 1 group)"}[self.norm]

    def to_dict(self):
        """Plain JSON-able data; :meth:`from_dict` gives back an equal config."""
        out = dataclasses.asdict(self)
        out["overrides"] = dict(self.overrides)
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
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{key}: {theirs[key]!r} vs {mine[key]!r}" for key in mine if mine[key] != theirs[key]]


def _id_value(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value)
    if isinstance(value, float):  # short (0.02, 1e-05), but exact: 6 digits would give two values one folder
        text = f"{value:g}" if float(f"{value:g}") == value else repr(value)
    return re.sub(r"[^A-Za-z0-9.]", "_", text)
