"""`lmlab report`: one self-contained HTML file, checked in a real headless Chromium."""

import math
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.recipes import REPO, tiny_lm
from typer.testing import CliRunner

from lmlab import load_recipe, train
from lmlab.analysis.compare import Comparison
from lmlab.analysis.report import (
    RunCurves,
    loss_figure,
    plot_loss,
    render_report,
    runs_tables_html,
    summary_grid,
)
from lmlab.console import Column
from lmlab.workspace.ledger import client
from lmlab.workspace.runs import RunRow

# screenshots a person can look at after the run (CI keeps the folder)
ARTIFACTS = Path(os.environ.get("LMLAB_TEST_ARTIFACTS", REPO / "test-artifacts"))
EXTERNAL = re.compile(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", re.I)


def synthetic_run(name, spike_at=None, overfit=False, tokens_per_step=512):
    rng = random.Random(0)
    train_pts = [(s, 2.0 + 2.0 * math.exp(-s / 30) + rng.gauss(0, 0.02)) for s in range(2, 101, 2)]
    if spike_at:
        train_pts = [(s, v + (1.0 if s == spike_at else 0)) for s, v in train_pts]
    val = [(s, 2.1 + 2.0 * math.exp(-s / 30) + (0.004 * (s - 40) ** 1.5 if overfit and s > 40 else 0))
           for s in range(10, 101, 10)]
    row = RunRow(name, name, "FINISHED", 0.0, 60.0, {}, {"final/val/loss": val[-1][1], "train/loss": 2.0,
                                                       "json/val/parse_rate": 0.75}, {})
    r = RunCurves(row, train=train_pts, val=val, lr=[(s, 1e-3) for s in range(2, 101, 2)],
                  tokens=[(s, tokens_per_step * s) for s in range(2, 101, 2)],
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
        # the second run differs in many settings: the full compare table is wider than the page
        many = {"train__weight_decay": 0.0, "model__dropout": 0.0, "model__n_head": 4, "train__schedule": "linear",
                "train__min_lr": 1e-4, "train__clip_grad": 0.5, "train__betas": [0.9, 0.99], "train__batch_size": 4}
        ids = [train(load_recipe(data=tiny_lm(run__name=f"lr-{lr:g}", train__lr=lr, **over)), quiet=True).run_id
               for lr, over in ((3e-3, {}), (1e-2, many))]
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
    dom = subprocess.run([*flags, f"--user-data-dir={tmp_path / 'profile-dom'}", "--window-size=1200,2000",
                          "--dump-dom", url],
                         capture_output=True, text=True, timeout=180).stdout
    assert '<table class="compare">' in dom and dom.count('<img class="plot"') == 4
    # the page's own script counts images that decoded to a non-zero size after the load event
    assert re.search(r'<body[^>]*data-plots-loaded="4"', dom), dom[:500]
    assert re.search(r'<body[^>]*data-table-fits="true"', dom), dom[:500]  # no sideways scrolling at 1200 px
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={shot}",
                    "--window-size=1200,2000", url], capture_output=True, timeout=180)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    image.save(ARTIFACTS / "report.png")
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 50  # not blank: text, table rules and coloured curves


def test_legends_sit_beside_the_curves_and_far_apart_runs_get_a_log_axis():
    close = [synthetic_run("a"), synthetic_run("b", tokens_per_step=2048)]  # 4× apart: a linear axis
    far = [synthetic_run("pretrain", tokens_per_step=100_000), synthetic_run("sft", tokens_per_step=50)]
    for runs, scale in ((close, "linear"), (far, "log")):
        fig = loss_figure(runs, "tokens")
        ax = fig.axes[0]
        assert ax.get_xscale() == scale and ax.get_legend() is None and len(fig.legends) == 1
        fig.draw_without_rendering()  # constrained layout places the legend: it must not overlap the plot area
        legend, plot = fig.legends[0].get_window_extent(), ax.get_window_extent()
        assert legend.x0 >= plot.x1
    assert "log scale" in loss_figure(far, "tokens").axes[0].get_xlabel()
    assert loss_figure(far, "step").axes[0].get_xscale() == "linear"


def test_the_runs_table_shows_what_differs_and_folds_the_rest():
    n = 3
    cols = [Column("run_id", "run", [f"{i}" * 32 for i in range(n)], "info", lambda v: v[:8]),
            Column("name", "name", [f"r{i}" for i in range(n)], "info"),
            Column("status", "status", ["FINISHED"] * n, "info")]
    cols += [Column(f"train.p{k}", f"p{k}", [str(i * k) for i in range(n)], "param") for k in range(1, 10)]
    cols += [Column("model.same", "same", ["x"] * n, "param"),
             Column("best/val/loss", "best val loss", [1.0, 2.0, 3.0], "metric"),
             Column("val/ppl", "val ppl", [1.0, 2.0, 3.0], "metric")]
    table = Comparison(cols, caption="what the columns mean")
    shown = [c.key for c in summary_grid(table).columns]
    assert shown == ["run_id", "name", "train.p1", "train.p2", "train.p3", "train.p4", "train.p5", "train.p6",
                     "best/val/loss"]  # equal status / params left out, at most 6 params, key metrics kept
    # runs that differ everywhere (an SFT run beside a from-scratch one): the model and optimiser settings first
    keys = ["run.seed", "data.path", "data.max_examples", "model.pretrained", "model.n_layer", "model.n_head",
            "model.d_model", "adapter.kind", "train.lr", "train.min_lr", "train.weight_decay"]
    wide = Comparison(cols[:2] + [Column(k, k, ["a", "b", "c"], "param") for k in keys])
    assert [c.key for c in summary_grid(wide).columns] == ["run_id", "name", "run.seed", "model.n_layer", "model.n_head",
                                                           "adapter.kind", "train.lr", "train.min_lr"]
    html = runs_tables_html(table)
    assert html.index('<table class="compare">') < html.index("<details>") < html.index('<table class="compare-full">')
    assert "3 more differing hyperparameters are in the full table" in html and "what the columns mean" in html
