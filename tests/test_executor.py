"""The one executor: same results in any mode, workers die with their parent, Dask optional."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import bayes_dgme as bd
from bayes_dgme.executor import DASK_MISSING, MissingExtraError, executor

REPO = Path(__file__).resolve().parent.parent


def test_map_keeps_order_and_as_completed_returns_every_result():
    items = [float(i) for i in range(9)]
    want = [math.sqrt(v) for v in items]
    with executor(None, 1) as ex:
        assert ex.kind == "serial"
        assert ex.map(math.sqrt, items) == want
    with executor(None, 2) as ex:
        assert ex.kind == "processes"
        assert ex.map(math.sqrt, items) == want
        assert sorted(ex.as_completed(math.sqrt, items)) == sorted(want)


@pytest.mark.parametrize(("kwargs", "field"), [({"cluster": "nonsense"}, "cluster:"), ({"cluster": 3}, "cluster:"),
                                               ({"workers": 0}, "workers:"), ({"workers": 1.5}, "workers:")])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        executor(**kwargs)


def test_a_cluster_without_dask_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(MissingExtraError) as info:
        executor("local", 2)
    assert str(info.value) == DASK_MISSING == "--cluster needs the dask extra: pip install 'bayes_dgme[dask]'"
    assert isinstance(info.value, ValueError)  # the CLI prints it as one line
    with pytest.raises(MissingExtraError, match="dask extra"):  # a study refuses before it starts
        bd.run_study("d1_exact", n=[50], reps=1, estimators=["em"], out=tmp_path / "s", cluster="local",
                     progress=False)
    assert not (tmp_path / "s").exists()
    with executor(None, 1) as ex:  # no cluster: no Dask needed
        assert ex.map(abs, [-1]) == [1]


# ------------------------------------------------------------------------------------ parent death
_PARENT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from bayes_dgme.executor import executor

    def task(folder):
        Path(folder, f"{os.getpid()}.pid").write_text("")
        time.sleep(300)
        return os.getpid()

    if __name__ == "__main__":
        with executor(None, 2) as ex:
            for _ in ex.as_completed(task, [sys.argv[1]] * 2):
                pass
    """
)


def _children(pid: int) -> set[int]:
    """All live descendants of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    out, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - out
        out |= frontier
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_and_resource_tracker_end_when_the_parent_is_killed(tmp_path, sig):
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        workers = {int(p.stem) for p in tmp_path.glob("*.pid")}
        children = _children(proc.pid)
        assert len(workers) == 2 and workers <= children
        assert len(children) >= 3, children  # the two workers and multiprocessing's resource tracker
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in children if _alive(p)], "processes outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in children:  # never leave a stray process behind, whatever failed
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        proc.wait(timeout=30)
