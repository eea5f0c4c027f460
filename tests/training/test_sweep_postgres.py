"""Optuna's distributed mode for real: two `lmlab sweep` commands, as if on two machines (each its own workspace and
ledger), share one study on a PostgreSQL server this test starts on 127.0.0.1 (Debian's postgresql package; the
test skips when its binaries or the psycopg driver are missing: `make install-postgres`)."""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers.recipes import tiny_lm

pytestmark = pytest.mark.slow


def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install postgresql; or make install-postgres)")
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed (pip install 'psycopg[binary]')")
    # postgres refuses to run as root: run it as the postgres user the Debian package creates
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="lmlab-pg-"))
    root.chmod(0o755)
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, port = root / "data", free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "lmlab", "--auth=trust"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                    f"-h 127.0.0.1 -p {port} -k {root}", "start"], check=True, capture_output=True)
    try:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={port} user=lmlab dbname=postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE sweeps")
        yield f"postgresql://lmlab@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_machines_share_one_study_on_postgresql(tmp_path, postgres_url, monkeypatch):
    monkeypatch.delenv("LMLAB_TRACKING_URI", raising=False)
    recipe = tmp_path / "recipe.yaml"
    # trials of a few seconds each, so that both commands are up before the first takes every trial
    recipe.write_text(yaml.safe_dump(tiny_lm(eval__max_batches=2, train__max_steps=48, eval__every_steps=16)))
    machines = [tmp_path / "a", tmp_path / "b"]
    cmd = [sys.executable, "-c", "from lmlab.cli import main; main()", "sweep", str(recipe), "--grid",
           "train.lr=1e-3,3e-3", "--grid", "model.d_model=32,64", "--study-storage", postgres_url, "--name", "pg"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for folder in machines:
        folder.mkdir()
        procs.append(subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs

    import optuna

    study = optuna.load_study(study_name="pg", storage=postgres_url)
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # no trial run twice
    hosts = {t.user_attrs["lmlab.worker"] for t in trials}
    assert len(hosts) == 2  # both commands took trials

    from lmlab.workspace.layout import ledger_uri
    from lmlab.workspace.sweeps import TAG_TRIAL, sweep_runs

    numbers = []
    for folder in machines:  # each machine's ledger holds the trials it ran, under its own parent run
        found = sweep_runs("pg", ledger_uri(folder / "lmlab-runs"))
        assert found.parent is not None and found.parent.status == "FINISHED"
        numbers += [int(r.tags[TAG_TRIAL]) for r in found.trials]
    assert sorted(numbers) == [0, 1, 2, 3]
