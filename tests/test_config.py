"""A run is a value: RunConfig's ids, equality, JSON round trips and refusals."""
import itertools
import json

import pytest

from normstudy import recipe as recipe_lib
from normstudy.config import RunConfig


def test_ids_are_readable_and_name_every_field_that_varies():
    assert RunConfig("gn", groups=4, batch_size=32).run_id == "gn-g4-b32-e20-s0"
    assert RunConfig("bn").run_id == "bn-b512-e20-s0"
    assert RunConfig("ln", seed=2, epochs=5).run_id == "ln-b512-e5-s2"
    assert RunConfig("gn", overrides=(("cutout", 8), ("flip", False))).run_id == "gn-g2-b512-e20-s0-cutout8-flipoff"
    assert RunConfig("bn", data="synthetic", holdout=100).run_id == "bn-b512-e20-s0-synthetic-holdout100"
    assert RunConfig("gn", groups=4, seed=1).cell == "gn-g4-b512-e20"


def test_equal_runs_are_equal_however_they_are_written():
    # Defaults filled in, recipe fields given as overrides moved to their fields, an override equal
    # to the default dropped, overrides in any order.
    assert RunConfig("gn") == RunConfig("gn", groups=2, batch_size=512, epochs=20)
    assert RunConfig("gn", overrides=(("batch_size", 32), ("gn_groups", 4))) == RunConfig("gn", groups=4, batch_size=32)
    assert RunConfig("bn", overrides=(("cutout", 0),)) == RunConfig("bn")
    assert RunConfig("bn", overrides=(("cutout", 8), ("flip", False))) == RunConfig("bn", overrides=(("flip", False), ("cutout", 8)))
    assert RunConfig("ln").groups == 1 and RunConfig("bn").groups is None


def test_round_trip_through_json():
    config = RunConfig("gn", seed=3, batch_size=8, epochs=2, groups=16, overrides=(("lr_per_32", 0.02),),
                       data="synthetic", holdout=50)
    again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.run_id == config.run_id and hash(again) == hash(config)
    assert again.recipe == config.recipe and recipe_lib.peak_lr(again.recipe) == pytest.approx(0.02 * 8 / 32)


def test_two_different_configurations_never_share_a_folder():
    configs = {RunConfig(norm, seed=seed, batch_size=batch, epochs=epochs, groups=groups if norm == "gn" else None,
                         overrides=overrides, data=data)
               for norm, seed, batch, epochs, groups, overrides, data in itertools.product(
                   ("bn", "ln", "gn"), (0, 1), (8, 512), (1, 20), (1, 2, 32),
                   ((), (("cutout", 8),), (("lr_per_32", 0.02),), (("flip", False),)), ("cifar10", "synthetic"))}
    assert len({config.run_id for config in configs}) == len(configs) > 300


def test_overrides_that_differ_past_six_digits_get_their_own_folders():
    # Bug: float overrides were written with 6 significant digits, so lr_per_32 = 0.0200001 and
    # 0.0200002 shared a folder (the second run was refused; a grid counted the first twice).
    ids = [RunConfig("bn", overrides=(("lr_per_32", value),)).run_id for value in (0.0200001, 0.0200002, 0.02)]
    assert ids == ["bn-b512-e20-s0-lr_per_32_0.0200001", "bn-b512-e20-s0-lr_per_32_0.0200002",
                   "bn-b512-e20-s0-lr_per_32_0.02"]  # the key's last digit kept apart from the value


@pytest.mark.parametrize("kwargs, message", [
    (dict(norm="xn"), "unknown norm 'xn'"),
    (dict(norm="bn", groups=4), "groups=4 applies to GroupNorm only"),
    (dict(norm="gn", groups=3), "groups=3 must divide the 32 channels"),
    (dict(norm="gn", seed=-1), "seed=-1 must be an integer"),
    (dict(norm="gn", batch_size=0), "batch_size=0: must lie in"),
    (dict(norm="gn", overrides=(("lr", 0.1),)), "unknown recipe key 'lr'"),
    (dict(norm="gn", data="imagenet"), "data='imagenet'"),
])
def test_bad_configurations_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**kwargs)


def test_unknown_keys_in_a_stored_configuration_are_refused():
    with pytest.raises(ValueError, match="unknown run configuration keys: colour"):
        RunConfig.from_dict({**RunConfig("bn").to_dict(), "colour": "red"})
