"""The requirement files agree: ranges for users (Colab's own torch included), exact pins for CI.

requirements.txt, requirements-dev.txt and requirements-ray.txt say what the code needs, as
ranges, and pyproject.toml declares the same ranges for `pip install .` (its dependencies and its
extras ray and dev); requirements-lock.txt pins every package of the CI environment, and is used
as constraints (`pip install -e . -r ... -c requirements-lock.txt`).
"""
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = "requirements-lock.txt"
RANGES = ("requirements.txt", "requirements-dev.txt", "requirements-ray.txt")
# What Google Colab ships (torch 2.11 / torchvision 0.26, CUDA 12.8, Python 3.12):
# `pip install -r requirements.txt` there must keep them.
COLAB = {"torch": "2.11.0", "torchvision": "0.26.0"}
LOWER = "requirements-lower.txt"  # constraints of `make test-lower`: the suite at Colab's versions


def _lines(path):
    """(line number, text) of each line that is not blank or a comment, as pip reads them."""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if line:
            yield number, line


def read_requirements(name):
    """[(file, line number, Requirement)] of a requirements file, following its -r includes."""
    path = ROOT / name
    found = []
    for number, line in _lines(path):
        include = re.fullmatch(r"(?:-r|--requirement)(?:\s+|=)(\S+)", line)
        if include:
            found += read_requirements(str((path.parent / include[1]).relative_to(ROOT)))
        elif line.startswith("-"):
            raise AssertionError(f"{name}:{number}: option this test does not read: {line!r}")
        else:
            found.append((name, number, Requirement(line)))
    return found


def read_lock():
    """{canonical name: Version} of the lock file; each line must be one exact pin."""
    pins = {}
    for number, line in _lines(ROOT / LOCK):
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, (
            f"{LOCK}:{number}: {line!r} is not an exact pin (name==version)")
        key = canonicalize_name(req.name)
        assert key not in pins, f"{LOCK}:{number}: {req.name} is pinned twice"
        pins[key] = Version(specs[0].version)
    return pins


def _applies(req):
    return req.marker is None or req.marker.evaluate()


def test_lock_pins_exact_versions():
    pins = read_lock()
    for name in ("torch", "torchvision", "ray", "pytest", "packaging", "ruff"):
        assert name in pins, f"{LOCK} does not pin {name}"


@pytest.mark.parametrize("name", RANGES)
def test_every_requirement_is_pinned_in_the_lock(name):
    pins = read_lock()
    missing = [f"{where}:{number}: {req.name}" for where, number, req in read_requirements(name)
               if _applies(req) and canonicalize_name(req.name) not in pins]
    assert not missing, f"not pinned in {LOCK}: {missing}"


@pytest.mark.parametrize("name", RANGES)
def test_lock_pins_satisfy_the_ranges(name):
    pins = read_lock()
    outside = [f"{where}:{number}: {req} but {LOCK} has {pins[canonicalize_name(req.name)]}"
               for where, number, req in read_requirements(name)
               if _applies(req) and canonicalize_name(req.name) in pins
               and not req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True)]
    assert not outside, outside


@pytest.mark.parametrize("package, colab_version", sorted(COLAB.items()))
def test_requirements_admit_colabs_torch(package, colab_version):
    """On Colab, `pip install -r requirements.txt` must find its torch and torchvision enough."""
    reqs = [req for _, _, req in read_requirements("requirements.txt")
            if canonicalize_name(req.name) == package]
    assert reqs, f"requirements.txt does not name {package}"
    for req in reqs:
        assert req.specifier.contains(colab_version), (
            f"requirements.txt: {req} would replace Colab's {package} {colab_version}")


def test_makefile_installs_with_the_lock_and_rebuilds_on_any_requirement_file():
    makefile = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+) :?= *(.*)$", makefile, re.M))
    assert variables.get("LOCK") == LOCK
    assert "$(VENV)/.installed: $(REQUIREMENTS)" in makefile
    stamp_needs = variables["REQUIREMENTS"].replace("$(LOCK)", LOCK).split()
    for path in sorted(ROOT.glob("requirements*.txt")):
        if path.name != LOWER:  # the lower-bound venv's own (below)
            assert path.name in stamp_needs, f"the Makefile's venv stamp does not depend on {path.name}"
    install = re.search(r"pip install .*-c \$\(LOCK\)", makefile)
    assert install and "requirements-dev.txt" in install[0] and "requirements-ray.txt" in install[0]


def test_the_lower_bound_check_installs_colabs_torch_within_the_ranges():
    """`make test-lower` runs the suite at the lowest torch the ranges admit, which is Colab's."""
    lower = {canonicalize_name(req.name): req for _, req in ((n, Requirement(line)) for n, line in _lines(ROOT / LOWER))}
    for package, colab_version in COLAB.items():
        specs = list(lower[package].specifier)
        assert [(s.operator, s.version) for s in specs] == [("==", colab_version)], f"{LOWER}: {lower[package]}"
    for where, number, req in read_requirements("requirements-dev.txt") + read_requirements("requirements-ray.txt"):
        pin = lower.get(canonicalize_name(req.name))
        if pin is not None and len(pin.specifier) == 1 and next(iter(pin.specifier)).operator == "==":
            assert req.specifier.contains(next(iter(pin.specifier)).version), f"{where}:{number}: {req} vs {LOWER}"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\$\(VENV_LOWER\)/\.installed: .*\$\(LOWER\)", makefile, re.M)
    assert re.search(r"pip install .*-r requirements-dev.txt -r requirements-ray.txt -c \$\(LOWER\)", makefile)


def _ranges(requirements):
    """{canonical name: (specifier set, marker)} of ``requirements``, each name once."""
    ranges = {}
    for req in requirements:
        assert canonicalize_name(req.name) not in ranges, f"{req.name} named twice"
        ranges[canonicalize_name(req.name)] = (req.specifier, str(req.marker))
    return ranges


@pytest.mark.parametrize("declared, name", [("dependencies", "requirements.txt"), ("ray", "requirements-ray.txt"),
                                            ("dev", "requirements-dev.txt")])
def test_pyproject_declares_the_ranges_of_the_requirement_files(declared, name):
    """`pip install .` (Colab included) gets the ranges that requirements.txt gives, and its extras
    those of the other files (each file's own lines, not its -r includes)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] if declared == "dependencies" else project["optional-dependencies"][declared]
    own = [req for where, _, req in read_requirements(name) if where == name]
    assert _ranges(map(Requirement, listed)) == _ranges(own), f"pyproject.toml's {declared} vs {name}"


def test_makefile_installs_the_package_editable_and_lints_before_the_tests():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\$\(VENV\)/\.installed: .*pyproject\.toml", makefile, re.M)
    assert re.search(r"pip install .*-e \. .*-c \$\(LOCK\)", makefile)
    assert re.search(r"^test: lint$", makefile, re.M)
    assert re.search(r"^lint: \$\(VENV\)/\.installed\n\t.*ruff check \.$", makefile, re.M)
