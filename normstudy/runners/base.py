"""What every runner shares: the failure report and run folders travelling between machines
(the runner interface itself is described in :mod:`normstudy.runners`)."""
import json
import os
from pathlib import Path

from .. import checkpoints


class RunsFailed(RuntimeError):
    """Some runs failed; ``failures`` maps each one's run id to one line saying why."""

    def __init__(self, failures):
        self.failures = dict(failures)
        super().__init__(f"{len(self.failures)} run{'s' if len(self.failures) > 1 else ''} failed: "
                         + "; ".join(f"{run_id}: {why}" for run_id, why in self.failures.items()))


def failure_line(err):
    """One line saying why a run failed, e.g. ``diverged: loss is NaN ... at epoch 3, batch 7``."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"diverged: {text}" if isinstance(err, FloatingPointError) else f"{type(err).__name__}: {text}"


# --- run folders between machines ---------------------------------------------------------------

def pack_run_folder(run_dir, *, checkpoint=True):
    """A run folder's files as ``{name: bytes}``, for shipping (a remote worker returning a
    finished run, or a driver sending an interrupted one to be resumed). Leaves out the lock,
    temporary files and, with ``checkpoint=False``, ``checkpoint.pt``."""
    files = {}
    for path in sorted(Path(run_dir).iterdir()):
        if (path.is_file() and not path.name.startswith(".") and not path.name.endswith(".tmp")
                and (checkpoint or path.name != "checkpoint.pt")):
            files[path.name] = path.read_bytes()
    return files


def unpack_run_folder(files, run_dir):
    """Write ``files`` (as :func:`pack_run_folder` gives them) into ``run_dir``, each atomically and
    ``record.json`` last, so the folder never looks finished before it is whole. Returns the record
    (parsed), or ``None`` when there is none. Names with a path in them are refused."""
    run_dir = Path(run_dir)
    for name in files:
        if not name or name != os.path.basename(name) or name in (".", ".."):
            raise ValueError(f"refusing to write {name!r}: not a plain file name")
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in sorted(files, key=lambda name: name == "record.json"):
        checkpoints.atomic_write(run_dir / name, lambda f, data=files[name]: f.write(data))
    return json.loads(files["record.json"]) if "record.json" in files else None
