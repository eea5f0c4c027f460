"""`lmlab report`: one self-contained HTML file, checked in a real headless Chromium."""

import math
import os
import random
import re
import shutil
import subprocess

import pytest
from helpers.recipes import tiny_lm
from typer.testing import CliRunner

from lmlab import load_recipe, train
from lmlab.analysis.report import RunCurves, plot_loss, render_report
from lmlab.workspace.ledger import client
from lmlab.workspace.runs import RunRow

EXTERNAL = re.compile(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", re.I)


def synthetic_run(name, spike_at=None, overfit=False):
    rng = random.Random(0)
    train_pts = [(s, 2.0 + 2.0 * math.exp(-s / 30) + rng.gauss(0, 0.02)) for s in range(2, 101, 2)]
    if spike_at:
        train_pts = [(s, v + (1.0 if s == spike_at else 0)) for s, v in train_pts]
    val = [(s, 2.1 + 2.0 * math.exp(-s / 30) + (0.004 * (s - 40) ** 1.5 if overfit and s > 40 else 0))
           for s in range(10, 101, 10)]
    row = RunRow(name, name, "FINISHED", 0.0, 60.0, {}, {"final/val/loss": val[-1][1], "train/loss": 2.0,
                                                       "json/val/parse_rate": 0.75}, {})
    r = RunCurves(row, train=train_pts, val=val, lr=[(s, 1e-3) for s in range(2, 101, 2)],
                  tokens=[(s, 512 * s) for s in range(2, 101, 2)],
                  generations=[{"prompt": "Name a colour.", "output": f"{name} says <b>red</b>"}])
    from lmlab.training.alerts import find_overfitting, find_spikes

    r.spikes = find_spikes(r.train, 20, 6.0)
    r.overfit_spans = find_overfitting(r.train, r.val, 3)
    r.alerts = [{"kind": "spike", "step": s, "message": "spike"} for s, _ in r.spikes]
    r.alerts += [{"kind": "overfitting", "step": b, "message": f"overfitting {a}–{b}"} for a, b in r.overfit_spans]
    return r


def test_report_marks_spikes_and_overfitting_and_is_self_contained():
    a, b = synthetic_run("run-a", spike_at=90), synthetic_run("run-b", overfit=True)
    assert [s for s, _ in a.spikes] == [90] and b.overfit_spans and b.overfit_spans[0][0] >= 40
    html = render_report([a, b], "<table class='compare'></table>", title="two <runs>")
    assert "<title>two &lt;runs&gt;</title>" in html  # text is escaped
    assert html.count('<img class="plot"') == 4 and html.count("data:image/png;base64,") == 4
    assert not EXTERNAL.search(html)  # nothing fetched from the network: no CDN, no fonts, no remote images
    alerts = html[html.index("<h2>Alerts</h2>"):html.index("<h2>Evaluation results</h2>")]
    assert alerts.count("<tr>") == 1 + len(a.alerts) + len(b.alerts) and "overfitting" in alerts
    gens = html[html.index("<h2>Generations</h2>"):]
    assert "run-a says &lt;b&gt;red&lt;/b&gt;" in gens and "run-b says" in gens  # side by side, escaped
    results = html[html.index("<h2>Evaluation results</h2>"):html.index("<h2>Generations</h2>")]
    assert "json/val/parse_rate" in results and "val/loss" in results and "train/loss" not in results
    assert plot_loss([RunCurves(a.row)]) is None  # nothing logged: no empty plot


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    ws = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        mp.delenv("LMLAB_TRACKING_URI", raising=False)
        ids = [train(load_recipe(data=tiny_lm(run__name=f"lr-{lr:g}", train__lr=lr)), quiet=True).run_id
               for lr in (3e-3, 1e-2)]
        from lmlab.analysis.compare import resolve_uri

        c = client(resolve_uri())
        for rid, text in zip(ids, ("Show HN: a tiny", "Show HN: my own"), strict=True):
            c.log_dict(rid, {"samples": [{"prompt": "Show HN:", "output": text}]}, "generations.json")
        out = CliRunner().invoke(__import__("lmlab.cli", fromlist=["app"]).app,
                                 ["report", "--name", "lr-*", "-o", str(ws / "report.html")])
        assert out.exit_code == 0, out.output
        assert out.output.startswith(f"wrote {ws / 'report.html'} (")
        yield ws / "report.html"


def test_report_from_the_ledger(report_file):
    html = report_file.read_text()
    assert html.count('<img class="plot"') == 4 and not EXTERNAL.search(html)
    table = html[html.index('<table class="compare">'):]
    assert "<th>lr</th>" in table and "lr-0.003" in table and "lr-0.01" in table
    assert "Show HN: my own" in html  # generations side by side
    assert '<td class="">val/loss</td>' in html  # evaluation results


def chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; the CI set-up installs it with "
                        "`apt-get install -y --no-install-recommends chromium fonts-dejavu-core`")
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium); CI runs this test")
    return exe


def test_report_renders_in_headless_chromium(report_file, tmp_path):
    from PIL import Image

    exe = chromium()
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    url = report_file.resolve().as_uri()
    dom = subprocess.run([*flags, f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180).stdout
    assert '<table class="compare">' in dom and dom.count('<img class="plot"') == 4
    # the page's own script counts images that decoded to a non-zero size after the load event
    assert re.search(r'<body[^>]*data-plots-loaded="4"', dom), dom[:500]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={shot}",
                    "--window-size=1200,2000", url], capture_output=True, timeout=180)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2000)
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 50  # not blank: text, table rules and coloured curves
