"""Runs mirrored to object storage, against a real S3 API server (moto, on 127.0.0.1): uploads while training go files
first and manifest last, storage keeps what the workspace keeps plus the run's ledger record, no credential is
written anywhere, and a fresh workspace lists, pulls (skipping a corrupted checkpoint), generates from and pushes
runs that live in storage. User mistakes about storage are one line and exit status 2."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import yaml
from helpers.recipes import tiny_lm
from helpers.s3 import ACCESS_KEY, SECRET_KEY, closed_port, s3_server

from lmlab import load_recipe, train
from lmlab.cli import main
from lmlab.workspace import layout
from lmlab.workspace import storage as storage_mod
from lmlab.workspace.ledger import client
from lmlab.workspace.manifest import MANIFEST

PREFIX = "team/runs-a"


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """One tiny run trained with run.storage on a moto server; every listing taken during its uploads (after each
    object written) recorded with the complete checkpoints it showed checked."""
    root = tmp_path_factory.mktemp("mirrored")
    with pytest.MonkeyPatch.context() as mp, s3_server(mp) as server:
        mp.chdir(root)
        mp.delenv("LMLAB_TRACKING_URI", raising=False)
        mp.delenv("LMLAB_STORAGE", raising=False)
        listings: list[dict] = []
        init = storage_mod.Store.__init__

        def watched_init(self, url, options=None):  # a listing after every object the uploader writes
            init(self, url, options)
            for method in ("put_file", "pipe_file"):
                original = getattr(self.fs, method)

                def write_then_list(*a, _original=original, **kw):
                    out = _original(*a, **kw)
                    listings.append(check_listing(server, server.objects(PREFIX)))
                    return out

                setattr(self.fs, method, write_then_list)

        mp.setattr(storage_mod.Store, "__init__", watched_init)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            result = train(load_recipe(data=tiny_lm(run__storage=server.url(PREFIX), checkpoint__keep_last=2)))
        mp.setattr(storage_mod.Store, "__init__", init)
        yield {"server": server, "result": result, "root": root, "listings": listings,
               "output": out.getvalue() + err.getvalue(), "url": server.url(PREFIX), "mp": mp}


def check_listing(server, objects: dict[str, int]) -> dict:
    """One listing: every checkpoint that has its manifest has every file the manifest lists, at its size, and the
    run's ledger record is there; which checkpoints were incomplete (files without a manifest yet)."""
    folders: dict[str, set[str]] = {}
    for key in objects:
        if "/checkpoints/step-" in key:
            folder, _, name = key.rpartition("/")
            folders.setdefault(folder, set()).add(name)
    complete, incomplete, problems = [], [], []
    for folder, names in folders.items():
        if MANIFEST not in names:
            incomplete.append(folder)
            continue
        complete.append(folder)
        manifest = json.loads(server.read(f"{folder}/{MANIFEST}"))
        for rel, entry in manifest["files"].items():
            if objects.get(f"{folder}/{rel}") != entry["size"]:
                problems.append(f"{folder}: manifest listed before {rel}")
        record = folder.split("/checkpoints/")[0] + "/ledger/run.json"
        if record not in objects:
            problems.append(f"{folder}: manifest listed before the ledger record")
    return {"complete": complete, "incomplete": incomplete, "problems": problems}


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = 0
    try:
        main_args(args)
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def main_args(args: list[str]) -> None:
    import sys

    argv, sys.argv = sys.argv, ["lmlab", *args]
    try:
        main()
    finally:
        sys.argv = argv


def test_uploads_go_files_first_and_manifest_last_while_training(mirrored):
    listings = mirrored["listings"]
    assert listings, "no upload happened"
    assert not [p for listing in listings for p in listing["problems"]]
    # listings were taken while checkpoints were half uploaded, and those were never counted complete
    assert any(listing["incomplete"] for listing in listings)
    assert mirrored["result"].status == "FINISHED"


def test_storage_keeps_what_the_workspace_keeps_and_the_full_ledger_record(mirrored):
    server, result = mirrored["server"], mirrored["result"]
    run_id = result.run_id
    local = [p.name for p in layout.list_checkpoints(result.run_dir)]
    store = storage_mod.Store(mirrored["url"])
    assert store.complete(run_id) == local == ["step-0000008", "step-0000012"]  # keep_last 2 (12 is also the best)
    assert not (result.run_dir / layout.UPLOADING).exists()  # snapshots removed once uploaded
    record = json.loads(server.read(f"{PREFIX}/runs/{run_id}/ledger/run.json"))
    assert record["status"] == "FINISHED" and record["run_name"] == "tiny"
    ledger = client(layout.ledger_uri(mirrored["root"] / "lmlab-runs"))
    for key in ("train/loss", "val/loss", "final/val/loss"):
        assert [p[0] for p in record["metrics"][key]] == [m.step for m in ledger.get_metric_history(run_id, key)]
    assert record["params"]["run.storage"] == mirrored["url"]
    assert f"{PREFIX}/runs/{run_id}/ledger/artifacts/recipe.yaml" in server.objects(PREFIX)
    assert "step-0000008, step-0000012 and the ledger record uploaded" in mirrored["output"]


def test_credentials_appear_in_no_param_tag_artifact_file_object_or_output(mirrored):
    server, result = mirrored["server"], mirrored["result"]
    secrets = (ACCESS_KEY.encode(), SECRET_KEY.encode())
    run = client(layout.ledger_uri(mirrored["root"] / "lmlab-runs")).get_run(result.run_id)
    values = " ".join([*run.data.params.values(), *run.data.tags.values()]).encode()
    assert not [s for s in secrets if s in values]
    written = [p for p in (mirrored["root"] / "lmlab-runs").rglob("*") if p.is_file()]  # ledger, artifacts, ckpts
    assert any(p.name == "mlflow.db" for p in written) and any(p.suffix == ".safetensors" for p in written)
    assert not [(p, s) for p in written for s in secrets if s in p.read_bytes()]
    objects = server.objects()
    assert len(objects) > 20
    assert not [(k, s) for k in objects for s in secrets if s in server.read(k)]
    assert not [s for s in secrets if s in mirrored["output"].encode()]


def test_a_fresh_workspace_lists_pulls_and_resolves_a_run_from_storage(mirrored, tmp_path, monkeypatch, capsys):
    run_id, url = mirrored["result"].run_id, mirrored["url"]
    monkeypatch.chdir(tmp_path)
    # listing reads the records in storage and writes nothing here
    code, out, err = cli(["runs", "--storage", url, "--format", "json"], capsys)
    assert code == 0, err
    (row,) = json.loads(out)
    assert (row["run_id"], row["status"]) == (run_id, "FINISHED") and "final/val/loss" in row["metrics"]
    assert not (tmp_path / "lmlab-runs").exists()
    code, out, err = cli(["runs", "--storage", url], capsys)
    assert "storage only" in out
    # pull the newest checkpoint: verified, and the ledger record imported with its full history
    code, out, err = cli(["pull", run_id[:8], "--last", "--storage", url], capsys)
    assert code == 0, err
    checkpoint = layout.run_dir("lmlab-runs", run_id) / "checkpoints" / "step-0000012"
    assert str(checkpoint) in out and (checkpoint / MANIFEST).is_file()
    ledger = client(layout.ledger_uri("lmlab-runs"))
    here = ledger.get_run(run_id)
    assert here.info.status == "FINISHED" and here.data.tags[layout.TAG_RUN_DIR] == str(checkpoint.parent.parent)
    assert [m.step for m in ledger.get_metric_history(run_id, "train/loss")] == [2, 4, 6, 8, 10, 12]
    code, out, err = cli(["pull", run_id, "--last", "--storage", url], capsys)  # nothing new to download
    assert code == 0 and "already here" in out
    assert [m.step for m in ledger.get_metric_history(run_id, "train/loss")] == [2, 4, 6, 8, 10, 12]
    code, out, err = cli(["pull", run_id, "--step", "8", "--storage", url], capsys)
    assert code == 0 and (checkpoint.parent / "step-0000008" / MANIFEST).is_file()
    # the workspace's listing shows it as mirrored now
    code, out, err = cli(["runs"], capsys)
    assert "mirrored" in out


@pytest.mark.parametrize("command, how", [("generate", "env"), ("generate", "option"), ("export", "option")])
def test_generate_and_export_take_a_run_that_is_only_in_storage(mirrored, tmp_path, monkeypatch, capsys, command, how):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LMLAB_STORAGE", raising=False)
    args = {"generate": ["--prompt", "Show HN", "--max-new-tokens", "4", "--no-log"],
            "export": ["--out", str(tmp_path / "exported")]}[command]
    if how == "env":
        monkeypatch.setenv("LMLAB_STORAGE", mirrored["url"])
    else:
        args += ["--storage", mirrored["url"]]
    code, out, err = cli([command, mirrored["result"].run_id[:8], *args], capsys)
    assert code == 0, err
    assert (layout.run_dir("lmlab-runs", mirrored["result"].run_id) / "checkpoints" / "step-0000012").is_dir()
    if how == "option":  # --storage holds for the command only (the CLI may run in-process: notebooks, tests)
        assert "LMLAB_STORAGE" not in os.environ
    if command == "export":
        assert (tmp_path / "exported" / "config.json").is_file()


def test_a_corrupted_checkpoint_in_storage_is_skipped_for_the_one_before(mirrored, tmp_path, monkeypatch, capsys):
    server, run_id = mirrored["server"], mirrored["result"].run_id
    key = f"{PREFIX}/runs/{run_id}/checkpoints/step-0000012/model.safetensors"
    original = server.read(key)
    altered = bytearray(original)
    altered[-10] ^= 0xFF  # same size, one byte changed: only the sha256 can tell
    server.write(key, bytes(altered))
    try:
        monkeypatch.chdir(tmp_path)
        code, out, err = cli(["pull", run_id, "--last", "--storage", mirrored["url"]], capsys)
    finally:
        server.write(key, original)
    assert code == 0, err
    assert "skipped step-0000012 in storage: model.safetensors: sha256 differs from the manifest" in out
    run_dir = layout.run_dir("lmlab-runs", run_id)
    assert [p.name for p in layout.list_checkpoints(run_dir)] == ["step-0000008"]  # nothing of 12 left behind
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_push_uploads_a_local_run_after_the_fact_once(mirrored, monkeypatch, capsys):
    server, run_id = mirrored["server"], mirrored["result"].run_id
    monkeypatch.chdir(mirrored["root"])
    other = server.url("elsewhere")
    code, out, err = cli(["push", run_id[:8], "--storage", other], capsys)
    assert code == 0, err
    assert "2 checkpoint(s) uploaded (step-0000008, step-0000012) and the ledger record" in out
    assert storage_mod.Store(other).complete(run_id) == ["step-0000008", "step-0000012"]
    assert f"elsewhere/runs/{run_id}/ledger/run.json" in server.objects("elsewhere")
    code, out, err = cli(["push", run_id, "--storage", other], capsys)
    assert code == 0 and "0 checkpoint(s) uploaded (storage had them)" in out


def test_another_fsspec_protocol_goes_through_the_same_code(mirrored, tmp_path, monkeypatch, capsys):
    run_id = mirrored["result"].run_id
    url = (tmp_path / "nfs" / "runs").as_uri()  # file:///...
    monkeypatch.chdir(mirrored["root"])
    code, out, err = cli(["push", run_id, "--storage", url], capsys)
    assert code == 0 and "2 checkpoint(s) uploaded" in out, err
    assert (tmp_path / "nfs" / "runs" / "runs" / run_id / "ledger" / "run.json").is_file()
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["pull", run_id, "--storage", url], capsys)  # the best: step 12
    assert code == 0, err
    assert (layout.run_dir("lmlab-runs", run_id) / "checkpoints" / "step-0000012" / MANIFEST).is_file()


def test_where_a_run_is_stored_is_no_difference_between_runs():
    from lmlab.analysis.compare import is_bookkeeping

    assert all(is_bookkeeping(k) for k in ("run.storage", "run.storage_options", "run.storage_options.endpoint_url"))


@pytest.fixture
def storage_files(mirrored, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LMLAB_STORAGE", raising=False)
    recipe = tmp_path / "recipe.yaml"
    tree = tiny_lm(train__max_steps=4, eval__every_steps=2)  # its data path resolves under $LMLAB_DATA
    recipe.write_text(yaml.safe_dump(tree))
    secret_opts = tmp_path / "secret.yaml"
    tree["run"]["storage_options"] = {"client_kwargs": {"aws_secret_access_key": SECRET_KEY}}
    secret_opts.write_text(yaml.safe_dump(tree))
    return {"recipe": str(recipe), "secret_opts": str(secret_opts), "url": mirrored["url"],
            "run": mirrored["result"].run_id, "closed": f"http://127.0.0.1:{closed_port()}"}


MISTAKES = [
    ("endpoint-refuses", ["run", "{recipe}", "--storage", "s3://lmlab-test/x"], {"AWS_ENDPOINT_URL": "{closed}"},
     "storage s3://lmlab-test/x: does not answer (Could not connect to the endpoint URL"),
    ("no-bucket", ["run", "{recipe}", "--storage", "s3://no-such-bucket/x"], {},
     "storage s3://no-such-bucket/x: The specified bucket does not exist; create the bucket first"),
    ("credentials-in-url", ["run", "{recipe}", "--storage", f"s3://{ACCESS_KEY}:{SECRET_KEY}@lmlab-test/x"], {},
     "run.storage: holds credentials (user:password@)"),
    ("credentials-in-options", ["run", "{secret_opts}"], {},
     "run.storage_options: client_kwargs.aws_secret_access_key would be recorded with the run"),
    ("unknown-protocol", ["run", "{recipe}", "--storage", "nosuch://bucket/x"], {},
     "storage nosuch://bucket/x: Protocol not known: nosuch"),
    ("env-storage-refuses", ["run", "{recipe}"], {"LMLAB_STORAGE": "s3://lmlab-test/y", "AWS_ENDPOINT_URL": "{closed}"},
     "storage s3://lmlab-test/y: does not answer"),
    ("pull-without-storage", ["pull", "{run}"], {}, "no storage given: pass --storage URL"),
    ("pull-unknown-run", ["pull", "0123abcd", "--storage", "{url}"], {},
     "storage s3://lmlab-test/team/runs-a: no run '0123abcd' there"),
    ("pull-missing-step", ["pull", "{run}", "--step", "5", "--storage", "{url}"], {},
     "--step 5: s3://lmlab-test/team/runs-a/runs/{run} has no complete checkpoint at step 5 (it has step(s) 8, 12)"),
    ("pull-two-choices", ["pull", "{run}", "--best", "--last", "--storage", "{url}"], {},
     "lmlab pull: give one of --best, --last, --step N"),
    ("push-unknown-run", ["push", "0123abcd", "--storage", "{url}"], {}, "0123abcd"),
    ("runs-storage-refuses", ["runs", "--storage", "s3://lmlab-test/x"], {"AWS_ENDPOINT_URL": "{closed}"},
     "storage s3://lmlab-test/x: does not answer"),
    ("resume-not-in-storage", ["run", "--resume", "0123abcd", "--storage", "{url}"], {},
     "storage s3://lmlab-test/team/runs-a: no run '0123abcd' there"),
    ("generate-not-in-storage", ["generate", "0123abcd", "-p", "hi", "--storage", "{url}"], {},
     "storage s3://lmlab-test/team/runs-a: no run '0123abcd' there"),
    ("export-credentials-in-url", ["export", "0123abcd", "-o", "out", "--storage",
                                   f"s3://{ACCESS_KEY}:{SECRET_KEY}@lmlab-test/x"], {},
     "holds credentials (user:password@)"),
    ("serve-storage-refuses", ["serve", "0123abcd", "--storage", "s3://lmlab-test/x"], {"AWS_ENDPOINT_URL": "{closed}"},
     "storage s3://lmlab-test/x: does not answer"),
]


@pytest.mark.parametrize("case, args, env, first", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_storage_mistake_is_one_line_and_status_2(storage_files, monkeypatch, capsys, case, args, env, first):
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(**storage_files))
    code, out, err = cli([a.format(**storage_files) for a in args], capsys)
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and first.format(**storage_files) in lines[0], err
    assert "Traceback" not in err and SECRET_KEY not in err + out and ACCESS_KEY not in err + out
    assert not (Path("lmlab-runs") / "mlflow.db").exists() or case.startswith(("pull", "push", "runs"))


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are Linux's")
def test_uploads_run_below_the_training_threads_cpu_priority():
    """The uploader lowers its own and fsspec's I/O thread's priority, never the caller's (the training loop's)."""
    import threading

    import fsspec.asyn

    from lmlab.workspace.mirror import UPLOAD_NICENESS, _yield_cpu

    fsspec.asyn.get_loop()  # fsspec's I/O thread, as an s3:// store starts it
    seen: dict[str, int] = {}

    def uploader():
        _yield_cpu()
        seen["uploader"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=uploader)
    t.start()
    t.join()
    assert seen["uploader"] >= UPLOAD_NICENESS > before
    assert os.getpriority(os.PRIO_PROCESS, fsspec.asyn.iothread[0].native_id) >= UPLOAD_NICENESS
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
