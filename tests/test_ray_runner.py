"""The Ray runner on CPU with an embedded Ray: the same records and files as run_one, no run lost
or counted twice when a worker dies, interrupted runs continued, failures as the runners' interface
says, and one line when Ray is missing."""
import contextlib
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import normstudy.runners
from normstudy import checkpoints, data, report
from normstudy import run as run_lib
from normstudy.config import RunConfig
from normstudy.runners import RunsFailed
from normstudy.runners import ray as ray_runner

GRID = [RunConfig(norm="bn", data="synthetic", epochs=1, batch_size=512, seed=0),
        RunConfig(norm="gn", data="synthetic", epochs=1, batch_size=512, seed=1)]
TWO_EPOCHS = RunConfig(norm="ln", data="synthetic", epochs=2, batch_size=512, seed=2)
TIMING = {"seconds", "device"}  # record fields that differ between any two executions
ROOT = Path(__file__).resolve().parent.parent


def comparable(record):
    """A record without its timings (and the figures derived from them)."""
    record = {key: value for key, value in record.items() if key not in TIMING}
    record["history"] = {k: v for k, v in record["history"].items() if k != "epoch_seconds"}
    record["final"] = {k: v for k, v in record["final"].items() if k != "seconds_per_epoch"}
    return record


@pytest.fixture(scope="module")
def ray_cluster():
    """One embedded Ray of 2 CPUs for the whole module (its start costs seconds)."""
    ray = pytest.importorskip("ray", reason="Ray is optional (pip install -r requirements-ray.txt); CI installs it")
    ray_runner.init_ray(num_cpus=2, num_gpus=0)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """GRID trained by run_one in this process: {run id: (record, run folder)}."""
    out = tmp_path_factory.mktemp("direct")
    return {config.run_id: (run_lib.run_one(config, out, progress=False, log=lambda line: None, device="cpu"),
                            out / config.run_id) for config in GRID}


def test_ray_runner_gives_the_records_and_files_of_run_one(ray_cluster, references, tmp_path):
    lines, records = [], []
    threads = torch.get_num_threads()  # as many as run_one had here: the same sums, bit for bit
    runner = ray_runner.RayRunner(workers=1, cpus_per_worker=threads, runs_per_worker=2,  # both runs at once
                                  log=lines.append)
    runner.run(GRID, out=tmp_path, device="cpu", on_record=records.append)
    assert lines == [f"ray: 1 worker(s) on 1 node(s), GPUs: 0 (CPU workers, {threads} CPU(s) each), "
                     "2 run(s) at a time per worker"]
    assert sorted(r["id"] for r in records) == sorted(c.run_id for c in GRID)
    for record in records:
        reference, reference_dir = references[record["id"]]
        assert comparable(record) == comparable(reference)
        run_dir = tmp_path / record["id"]
        assert comparable(json.loads((run_dir / "record.json").read_text())) == comparable(reference)
        assert_same_run_folder(run_dir, reference_dir)
    assert runner.actors == [] and runner.retries == 0


def assert_same_run_folder(run_dir, reference_dir):
    """The same files, figures and configuration byte for byte, and the same weights."""
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in reference_dir.iterdir())
    for name in ("config.json", "curves.png", "misclassified.png"):
        assert (run_dir / name).read_bytes() == (reference_dir / name).read_bytes(), name
    ours, theirs = (checkpoints.load_torch(d / "weights.pt") for d in (run_dir, reference_dir))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


class _Interrupt(Exception):
    pass


STACKED = [RunConfig(norm="bn", data="synthetic", epochs=1, batch_size=512, seed=3),
           RunConfig(norm="bn", data="synthetic", epochs=1, batch_size=512, seed=4)]  # a stack holds one norm


def test_a_stack_is_one_unit_on_one_worker_with_the_local_runners_records_and_files(ray_cluster, tmp_path):
    # Issue 19, item 4: Ray workers train the units the local runner trains (runners.units), a stack
    # of runs as one task on one worker; each run still comes back as an ordinary run folder.
    from normstudy.runners.local import LocalRunner
    local = []
    LocalRunner(stack=2).run(STACKED, out=tmp_path / "local", device="cpu", on_record=local.append)
    lines, records = [], []
    threads = torch.get_num_threads()  # as many as the local runner had here: the same sums, bit for bit
    runner = ray_runner.RayRunner(workers=1, cpus_per_worker=threads, runs_per_worker=2, stack=2, log=lines.append)
    runner.run(STACKED, out=tmp_path / "ray", device="cpu", on_record=records.append)
    assert lines == [f"ray: 1 worker(s) on 1 node(s), GPUs: 0 (CPU workers, {threads} CPU(s) each), "
                     "2 unit(s) at a time per worker"]
    runs = [config.run_id for config in STACKED]  # one stack of both, in norm order
    assert [r["id"] for r in records] == runs and [r["stack"] for r in records] == [{"size": 2, "runs": runs}] * 2
    by_id = {record["id"]: record for record in local}
    for record in records:
        assert comparable(record) == comparable(by_id[record["id"]])
        assert_same_run_folder(tmp_path / "ray" / record["id"], tmp_path / "local" / record["id"])
    assert runner.actors == [] and runner.retries == 0


def test_the_study_command_trains_stacks_on_ray(ray_cluster, tmp_path, capsys):
    # `--runner ray --stack 2`, once refused in one line, trains the grid's runs as stacks on the workers.
    from conftest import call_main
    from normstudy import study
    out = tmp_path / "grid"
    code, _, err = call_main(study.main, ["batch", "--smoke", "--norms", "bn", "--seeds", "0", "1", "--batch-sizes",
                                          "512", "--runner", "ray", "--stack", "2", "--quiet", "--out", str(out)], capsys)
    assert code == 0, err
    runs = ["bn-b512-e1-s0-synthetic", "bn-b512-e1-s1-synthetic"]
    for run_id in runs:
        assert run_lib.read_record(out / run_id)["stack"] == {"size": 2, "runs": runs}
    assert "2 of 2 runs finished" in (out / "results.md").read_text()


def test_a_lost_worker_loses_no_run_and_counts_none_twice(ray_cluster, references, tmp_path):
    # A grid stopped midway on the local runner: one run finished, one interrupted after epoch 1.
    done_id = GRID[0].run_id
    shutil.copytree(references[done_id][1], tmp_path / done_id)

    def interrupt(line):
        raise _Interrupt  # called after epoch 1 and its checkpoint
    with pytest.raises(_Interrupt):
        run_lib.run_one(TWO_EPOCHS, tmp_path, progress=False, log=interrupt, device="cpu")
    interrupted = checkpoints.load_torch(tmp_path / TWO_EPOCHS.run_id / "checkpoint.pt")["history"]

    grid = [*GRID, TWO_EPOCHS]
    lines, seen, killed = [], [], []
    runner = ray_runner.RayRunner(runs_per_worker=1, log=lines.append)

    def kill_the_worker_once(record):
        seen.append(record)
        if record["id"] != done_id and not killed:  # mid-grid: the worker has started the last run
            killed.extend(runner.actors)
            ray_cluster.kill(killed[0], no_restart=False)

    runner.run(grid, out=tmp_path, device="cpu", on_record=kill_the_worker_once)
    assert len(killed) == 1 and runner.retries == 1
    assert lines[1].startswith("ray: worker 0 lost (") and lines[1].endswith("); starting another")
    assert lines[2:] == [f"ray: {TWO_EPOCHS.run_id} goes back to the queue (attempt 2 of 3)"]
    # Each run reported once; the finished one first, as it was; the interrupted one continued.
    assert [r["id"] for r in seen] == [done_id, GRID[1].run_id, TWO_EPOCHS.run_id]
    assert seen[0] == references[done_id][0]
    assert comparable(seen[1]) == comparable(references[GRID[1].run_id][0])
    history = seen[2]["history"]
    assert len(history["test_acc"]) == 2 and history["epoch_seconds"][0] == interrupted["epoch_seconds"][0]
    finished, skipped = report.load_records(tmp_path)
    assert [r["id"] for r in finished] == sorted(c.run_id for c in grid) and skipped == []
    summary = report.summarize(finished)
    assert [(s["norm"], s["seeds"]) for s in summary["cells"]] == [("bn", [0]), ("ln", [2]), ("gn", [1])]


def test_a_run_whose_files_are_coming_back_when_stopped_is_still_delivered(ray_cluster, references, tmp_path,
                                                                            monkeypatch):
    # Ctrl-C while a finished run's files are written into out: the run is delivered whole while
    # stopping, not lost with its worker's scratch folder (and trained again next time).
    config = GRID[0]
    real, interrupted = ray_runner.unpack_run_folder, []

    def ctrl_c_midway(files, run_dir):
        if not interrupted:
            interrupted.append(run_dir.name)
            real({"checkpoint.pt": files["checkpoint.pt"]}, run_dir)  # one file written, then Ctrl-C
            raise KeyboardInterrupt
        return real(files, run_dir)
    monkeypatch.setattr(ray_runner, "unpack_run_folder", ctrl_c_midway)
    seen = []
    runner = ray_runner.RayRunner(workers=1, runs_per_worker=1, log=lambda line: None)
    with pytest.raises(KeyboardInterrupt):
        runner.run([config], out=tmp_path, device="cpu", on_record=seen.append)
    assert interrupted == [config.run_id]
    assert [comparable(r) for r in seen] == [comparable(references[config.run_id][0])]
    assert comparable(run_lib.read_record(tmp_path / config.run_id)) == comparable(references[config.run_id][0])


def test_writing_a_run_that_came_back_removes_a_killed_drivers_temporary_files(tmp_path):
    # A driver killed (SIGKILL) while it wrote a run's files leaves `.NAME.*.tmp` behind; the folder
    # never goes through run_one here (its runs train on the workers), so the next write removes them.
    run_dir = tmp_path / GRID[0].run_id
    run_dir.mkdir()
    (run_dir / ".weights.pt.0a1b2c3d.tmp").write_bytes(b"half of the weights")
    record = ray_runner._write_run(run_dir, {"config.json": b"{}", "record.json": b'{"id": "x"}'})
    assert record == {"id": "x"} and sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.json", "record.json"]


def test_a_result_for_a_folder_another_command_holds_fails_that_run_not_the_grid(tmp_path):
    # Review: a run folder locked by another command (it took the run after this driver claimed it)
    # made _deliver raise RunFolderBusy, which ended the whole grid and lost the other results.
    busy, free = GRID[0].run_id, GRID[1].run_id
    (tmp_path / busy).mkdir()
    finished, failures, delivered = set(), {}, []
    results = [{"id": busy, "files": {"record.json": b'{"id": "busy"}'}},
               {"id": free, "files": {"record.json": b'{"id": "free"}'}}]
    lock = subprocess.Popen([sys.executable, "-c", "import sys, time; from normstudy import run; "
                             "cm = run.folder_lock(sys.argv[1]); cm.__enter__(); print('held', flush=True); "
                             "time.sleep(60)", str(tmp_path / busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert lock.stdout.readline().strip() == "held"
        ray_runner.RayRunner._deliver(results, out=tmp_path, finished=finished, failures=failures,
                                      on_record=delivered.append)
    finally:
        lock.kill()
        lock.wait()
    assert delivered == [{"id": "free"}] and finished == {free}
    assert "holds its folder" in failures[busy] and not (tmp_path / busy / "record.json").exists()


def test_a_missing_dataset_is_raised_before_any_run_and_a_failed_run_is_named(ray_cluster, tmp_path):
    runner = ray_runner.RayRunner(log=lambda line: None)
    config = RunConfig(norm="bn", epochs=1)  # CIFAR-10, which the workers will not find
    with pytest.raises(data.DatasetError, match="not found and downloading is off"):
        runner.run([config], out=tmp_path, data_dir=tmp_path / "no-data", download=False, device="cpu",
                   on_record=lambda record: pytest.fail("no run should finish"))
    assert sorted(p.name for p in (tmp_path / config.run_id).iterdir()) == [".lock", "config.json"]
    # A damaged checkpoint fails its run (on the worker, which it travels to), with one line.
    damaged = RunConfig(norm="gn", data="synthetic", epochs=1, seed=5)
    (tmp_path / damaged.run_id).mkdir()
    (tmp_path / damaged.run_id / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunsFailed) as err:
        runner.run([damaged], out=tmp_path, device="cpu", on_record=lambda record: pytest.fail("it failed"))
    assert list(err.value.failures) == [damaged.run_id]
    assert err.value.failures[damaged.run_id].startswith("CheckpointError: ")
    assert not (tmp_path / damaged.run_id / "record.json").exists()
    assert runner.actors == []


def test_finished_runs_are_not_trained_again(ray_cluster, references, tmp_path):
    for run_id, (_, run_dir) in references.items():
        shutil.copytree(run_dir, tmp_path / run_id)
    seen = []
    runner = ray_runner.RayRunner(log=lambda line: pytest.fail(f"no worker should start: {line}"))
    runner.run(GRID, out=tmp_path, device="cpu", on_record=seen.append)
    assert seen == [references[c.run_id][0] for c in GRID]


def test_without_ray_the_runner_says_how_to_install_it_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.delitem(sys.modules, "normstudy.runners.ray", raising=False)
    monkeypatch.delattr(normstudy.runners, "ray", raising=False)
    module = importlib.import_module("normstudy.runners.ray")  # imports without Ray
    for make in (lambda: module.RayRunner(), lambda: module.RayRunner(address="auto"), module.init_ray):
        with pytest.raises(module.RayUnavailableError) as err:
            make()
        assert str(err.value) == "the ray runner needs Ray, which is not installed: pip install -r requirements-ray.txt"
    assert issubclass(module.RayUnavailableError, ValueError)  # the CLIs print it in one line, exit 2


def test_concurrency_one_means_one_run_per_worker():
    # Bug: make_runner passed --concurrency 1 on as "the default", which is 2 runs per GPU worker.
    pytest.importorskip("ray", reason="Ray is optional (pip install -r requirements-ray.txt); CI installs it")
    assert normstudy.runners.make_runner("ray", concurrency=1).runs_per_worker == 1
    assert normstudy.runners.make_runner("ray").runs_per_worker is None  # the worker's default: 2 on a GPU


def test_an_address_where_nothing_listens_is_refused_at_once():
    # Bug: --address HOST:PORT with no cluster there hung for minutes inside Ray's retries,
    # printing Ray's warnings, before any message of ours.
    pytest.importorskip("ray", reason="Ray is optional (pip install -r requirements-ray.txt); CI installs it")
    import socket
    import time
    with socket.socket() as probe:  # a port that was free a moment ago, now closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ray_runner.RayUnavailableError, match=rf"^ray: no Ray cluster answers at 127.0.0.1:{port} "):
        ray_runner._check_answers(f"127.0.0.1:{port}")  # what init_ray asks first (Ray may be up here)
    assert time.monotonic() - start < 10
    for address in (None, "auto", "ray://head:10001"):  # Ray's to resolve
        ray_runner._check_answers(address)


# --- issue 22: addresses, a broken Ray, runs of another command ---------------------------------

@contextlib.contextmanager
def listener(answer=None, host="127.0.0.1"):
    """A TCP server on a free loopback port that accepts connections and, with ``answer(conn)``,
    answers each; without one it says nothing. Yields its port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.socket(family)
    server.bind((host, 0))
    server.listen()
    accepted = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            accepted.append(conn)
            if answer is not None:
                with contextlib.suppress(OSError):
                    answer(conn)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        server.close()
        for conn in accepted:
            conn.close()


def http_1(conn):  # what `python -m http.server` says to anything it does not understand
    conn.recv(1024)
    conn.sendall(b"HTTP/1.0 400 Bad request version\r\nContent-Type: text/html\r\n\r\n")


def http_2(conn):  # what a gRPC server (Ray's GCS) opens with: a SETTINGS frame
    conn.recv(1024)
    conn.sendall(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))


def test_an_address_that_listens_but_is_not_ray_is_refused_within_seconds(tmp_path, capsys, monkeypatch):
    # Bug: --address at a port that listens but is not Ray (`python -m http.server 8265`) hung for
    # minutes in Ray's retries, printing "Failed to connect to GCS", deaf to SIGTERM.
    start = time.monotonic()
    with listener(http_1) as (port, _):
        with pytest.raises(ray_runner.RayUnavailableError, match=rf"^ray: 127.0.0.1:{port} answers, but not as a "
                                                                 r"Ray cluster \(is it another service, such as the "):
            ray_runner._check_answers(f"127.0.0.1:{port}")
    with listener() as (port, _):  # accepts, then says nothing
        with pytest.raises(ray_runner.RayUnavailableError, match=rf"^ray: 127.0.0.1:{port} accepts connections but "
                                                                 r"does not answer as a Ray cluster within 0.5 s"):
            ray_runner._check_answers(f"127.0.0.1:{port}", timeout=0.5)
    with listener(http_2) as (port, _):
        ray_runner._check_answers(f"127.0.0.1:{port}")  # speaks Ray's protocol: up to Ray
    assert time.monotonic() - start < 10

    # The command, in one line, before any run is claimed.
    pytest.importorskip("ray", reason="Ray is optional (pip install -r requirements-ray.txt); CI installs it")
    from conftest import call_main
    from normstudy import study
    monkeypatch.setattr(run_lib, "run_one", lambda *a, **k: pytest.fail("trained"))
    with listener(http_1) as (port, _):
        code, _, err = call_main(study.main, ["batch", "--smoke", "--runner", "ray", "--address", f"127.0.0.1:{port}",
                                              "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"python -m normstudy.study: error: ray: 127.0.0.1:{port} answers, but not as a Ray cluster")
    assert not any(tmp_path.iterdir())


def test_signals_work_while_connecting(tmp_path):
    # SIGTERM while the study waits for an address to answer: exit 143 in one line, at once.
    pytest.importorskip("ray", reason="Ray is optional (pip install -r requirements-ray.txt); CI installs it")
    with listener() as (port, accepted):
        process = subprocess.Popen([sys.executable, "-m", "normstudy.study", "batch", "--smoke", "--runner", "ray",
                                    "--address", f"127.0.0.1:{port}", "--quiet", "--out", str(tmp_path)],
                                   cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not accepted:  # it connected, and waits for an answer
                assert process.poll() is None and time.monotonic() < deadline, process.communicate()
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=4)  # it would give up on the address after 5 s
        finally:
            process.kill()
    assert process.returncode == 143
    assert err.strip().splitlines() == [f"python -m normstudy.study: terminated; finished runs are kept in {tmp_path} "
                                        "and interrupted ones in their checkpoints (run the same command again to "
                                        "continue)"]


def test_ipv6_addresses_in_brackets_lose_their_brackets():
    # Bug: `--address [::1]:PORT` with a Ray listening was refused: "Name or service not known".
    assert ray_runner.host_port("[::1]:6379") == ("::1", 6379)
    assert ray_runner.host_port("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert ray_runner.host_port("head.example:6379") == ("head.example", 6379)
    for address in (None, "auto", "ray://head:10001", "head"):
        assert ray_runner.host_port(address) is None  # Ray's to resolve
    if not socket.has_ipv6:
        return
    try:
        context = listener(http_2, host="::1")
        port, _ = context.__enter__()
    except OSError:  # no IPv6 loopback here
        return
    try:
        ray_runner._check_answers(f"[::1]:{port}")
    finally:
        context.__exit__(None, None, None)


def test_a_real_ray_cluster_passes_the_check(ray_cluster):
    ray_runner._check_answers(ray_cluster.get_runtime_context().gcs_address)


@pytest.mark.parametrize("inside, why", [("import no_such_dependency_of_ray", "ModuleNotFoundError: No module named "
                                                                            "'no_such_dependency_of_ray'"),
                                         ("raise RuntimeError('protobuf too new')", "RuntimeError: protobuf too new")])
def test_a_broken_ray_says_it_failed_to_import_and_why(tmp_path, monkeypatch, inside, why):
    # Bug: an ImportError raised inside Ray said "needs Ray, which is not installed"; another
    # exception while Ray imported ended in a traceback.
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text(inside + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    with pytest.raises(ValueError) as err:
        normstudy.runners.make_runner("ray")
    assert str(err.value) == (f"the ray runner could not import Ray, which is installed but failed ({why}); "
                              "reinstall it: pip install -r requirements-ray.txt")


def test_summary_only_needs_no_ray(tmp_path, capsys, monkeypatch):
    from conftest import call_main, write_fake_record
    from normstudy import study
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    config = RunConfig(norm="bn", data="synthetic", epochs=1, batch_size=512, seed=0)
    write_fake_record(tmp_path, config)
    code, out, err = call_main(study.main, ["batch", "--smoke", "--norms", "bn", "--batch-sizes", "512",
                                            "--runner", "ray", "--summary-only", "--out", str(tmp_path)], capsys)
    assert code == 0 and err == "" and "| BN | 50.00 |" in out


def test_a_run_another_command_trains_is_left_to_it_not_failed(tmp_path):
    # Issue 22, item 6, for Ray: a run whose folder another process holds is said and skipped.
    pytest.importorskip("ray", reason="Ray is optional (pip install -r requirements-ray.txt); CI installs it")
    lines, failures = [], {}
    runner = ray_runner.RayRunner(log=lines.append)
    run_dir = tmp_path / GRID[0].run_id
    run_dir.mkdir()
    with run_lib.folder_lock(run_dir):
        assert not runner._claim(run_dir, GRID[0], failures)
    assert failures == {} and lines == [f"ray: {GRID[0].run_id}: in use by process {os.getpid()}, another command "
                                        "that trains it; left to it"]


