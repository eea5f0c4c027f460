"""MLflow UI compatibility: a run recorded through a real `mlflow server` reads back over its REST API.

Slow: the server's start (database migrations, uvicorn) takes 30–80 s on 2 busy cores."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from helpers.recipes import tiny_lm

from lmlab import load_recipe, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base: str, path: str, **query) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def wait_healthy(base: str, proc: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer /health within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_run_reads_back_through_the_mlflow_server(workspace, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'db'}",
           "--default-artifact-root", str(tmp_path / "art"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with open(log, "w") as out:
        # its own process group: uvicorn's worker processes are stopped with it
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(base, proc, log)
        recipe = tiny_lm(ledger__uri=base, train__max_steps=4, eval__every_steps=2, run__name="via-server")
        result = train(load_recipe(data=recipe), quiet=True)

        run = get(base, "/api/2.0/mlflow/runs/get", run_id=result.run_id)["run"]
        assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "via-server"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert params["train.lr"] == "0.003" and params["derived.total_steps"] == "4"
        assert len(params["data.fingerprint.train"]) == 64 and params["tokenizer.hash"]
        assert metrics["final/val/loss"] == pytest.approx(result.metrics["val/loss"])
        assert "env.pkg.torch" in tags and tags["lmlab.task"] == "lm"
        history = get(base, "/api/2.0/mlflow/metrics/get-history", run_id=result.run_id, metric_key="train/loss")
        assert [m["step"] for m in history["metrics"]] == [2, 4]
        files = {f["path"] for f in get(base, "/api/2.0/mlflow/artifacts/list", run_id=result.run_id)["files"]}
        assert {"recipe.yaml", "environment.json"} <= files

        # lmlab's own readers work against the server too
        from lmlab.analysis.compare import compare, select_runs

        (row,) = select_runs(name="via-server", uri=base)
        assert compare([row], uri=base).csv().splitlines()[1].startswith(f"{result.run_id},via-server,FINISHED,")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
