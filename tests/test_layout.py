"""The package's layout as its docstring states it: each module imports only from those listed
before it (imports inside functions included), and every module is listed. Read from the source
(no module is imported), so it costs milliseconds."""
import ast
import re
from pathlib import Path

import normstudy

PACKAGE = Path(normstudy.__file__).resolve().parent


def listed_order():
    """The modules (and subpackages) in the order of the package docstring's list."""
    doc = normstudy.__doc__
    block = doc[doc.index("One module per concern"):].split("\n\n")[1]
    return [re.match(r"\s+(\w+)", line).group(1) for line in block.splitlines() if re.match(r"\s{4}\w", line)]


def unit_of(module):
    """``normstudy.fast.steps`` -> ``fast``; ``normstudy.run`` -> ``run``; the package itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "normstudy" else None


def imported_modules(path):
    """Every ``normstudy`` module ``path`` imports, anywhere in it, as absolute names."""
    here = ["normstudy", *path.relative_to(PACKAGE).with_suffix("").parts]
    package = here[:-1] if path.name != "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "normstudy"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "normstudy":
                continue
            found += [f"{module}.{alias.name}" for alias in node.names] if node.module is None else [module]
    return found


def test_each_module_imports_only_from_those_listed_before_it():
    order = listed_order()
    assert len(order) == len(set(order)) and "run" in order and "command" in order
    files = [p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py" and p != PACKAGE / "__init__.py"]
    units = {unit_of("normstudy." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)) for p in files}
    assert units == set(order), "every module of the package is listed in its docstring, and only those"
    upward = []
    for path in files:
        mine = unit_of("normstudy." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for module in imported_modules(path):
            theirs = unit_of(module)
            if theirs is not None and theirs != mine and order.index(theirs) > order.index(mine):
                upward.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert upward == []


def test_the_layout_reader_sees_upward_imports(tmp_path):
    # The check above would pass vacuously if imports were not found: they are, relative ones too.
    found = imported_modules(PACKAGE / "fast" / "graph_epoch.py")
    assert "normstudy.runtime" in found and "normstudy.data" in found and "normstudy.fast.steps" in found
    assert "normstudy.fit" in imported_modules(PACKAGE / "run.py")
