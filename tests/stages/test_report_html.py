"""The HTML run report in a real browser: headless Chromium loads report/index.html from disk.

Built on the session's small real run (tests/small_run.py: up to select, no sweep), whose data
has rows with `<script>`, an `<img onerror>` and a table-breaking string planted in their
instructions and source. Checks: the page renders (a non-blank screenshot of the window's size),
the cluster table holds every cluster, the page's own script ran (it sorts the table, also from
`#sort=` in the URL) with nothing on the console, and none of the planted code ran while every
planted string shows as text. Chromium is Debian's `chromium` (`.ci/run` installs it when apt
is available); without one the browser tests skip, saying so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from s2l_ray.stages.report import make_report
from tests.small_run import PLANTED

pytestmark = pytest.mark.ray
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _chromium() -> str:
    for name in BROWSERS:
        if found := shutil.which(name):
            return found
    pytest.skip("no Chromium found (looked for " + ", ".join(BROWSERS) + "); install it with "
                "`apt-get install -y chromium` (.ci/run does when apt is available)")


def headless(url: str, profile: Path, *args: str) -> tuple[str, list[str]]:
    """Load `url` in headless Chromium; returns (stdout, console messages). Chromium logs every
    console message (errors, uncaught exceptions, CSP violations) as an INFO:CONSOLE line."""
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium failed ({done.returncode}):\n{done.stderr[-3000:]}"
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


@pytest.fixture(scope="module")
def page(small_run) -> Path:
    # Every example of every cluster on the page, so every planted instruction is rendered.
    make_report(small_run.run.output_dir, examples_per_cluster=1000)
    return Path(small_run.run.output_dir) / "report" / "index.html"


def test_console_capture_sees_script_errors(tmp_path: Path) -> None:
    """The check below that the console stays quiet would be vacuous if errors never showed."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><title>t</title><script>notDefined();</script>")
    _, console = headless(bad.as_uri(), tmp_path / "profile", "--dump-dom")
    assert any("notDefined" in line for line in console), console


def test_page_renders_in_chromium(page: Path, small_run, tmp_path: Path) -> None:
    import matplotlib.image

    text = page.read_text(encoding="utf-8")
    # Self-contained: no URL to load anything from (images are data: URIs), CSP forbids it.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "default-src 'none'" in text
    shot = tmp_path / "shot.png"
    _, console = headless(page.as_uri(), tmp_path / "p1", "--window-size=1280,1600",
                          f"--screenshot={shot}")
    assert console == []
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1600, 1280) and shot.stat().st_size > 20_000
    assert pixels[..., :3].std() > 0.05  # not a blank page
    dom, console = headless(page.as_uri(), tmp_path / "p2", "--dump-dom")
    assert console == [], console  # no script error, no CSP violation
    k = small_run.cluster.k
    assert '<table id="clusters">' in dom
    assert len(re.findall(r'<tr data-cluster="\d+"', dom)) == k
    assert 'data-sorted="size-desc"' in dom  # the page's script ran (allowed by its hash)
    # the run at a glance: every stage up to select is done, the sweep is not
    for stage in ("ingest", "train_ref", "trajectories", "cluster", "select"):
        assert re.search(rf"<td>{stage}</td><td>done</td>", dom), stage
    assert re.search(r"<td>sweep</td><td><span[^>]*>not run", dom)
    assert "No finished sweep in this run." in dom
    for name in ("cluster_sizes", "cluster_trajectories", "source_share"):
        assert f'alt="{name}" src="data:image/png;base64,' in dom
    assert "select: s2l" in dom and "<svg class=\"spark\"" in dom


@pytest.mark.parametrize("spec", ["size-asc", "size-desc", "loss-asc", "loss-desc"])
def test_cluster_table_sorts(page: Path, tmp_path: Path, spec: str) -> None:
    dom, console = headless(f"{page.as_uri()}#sort={spec}", tmp_path / "p", "--dump-dom")
    assert console == []
    assert f'data-sorted="{spec}"' in dom
    key, order = spec.split("-")
    values = [float(v) for v in re.findall(rf'<tr data-cluster="\d+"[^>]*data-{key}="([^"]+)"',
                                           dom)]
    assert len(values) > 1 and len(set(values)) > 1
    assert values == sorted(values, reverse=order == "desc")


def test_planted_scripts_do_not_run_and_show_as_text(page: Path, tmp_path: Path) -> None:
    import html

    raw = page.read_text(encoding="utf-8")
    for text in PLANTED:
        assert text not in raw  # never written unescaped
        assert html.escape(text, quote=True) in raw
    dom, console = headless(page.as_uri(), tmp_path / "p", "--dump-dom")
    assert console == []  # a planted script blocked by the CSP would show up here
    title = re.search(r"<title>(.*?)</title>", dom).group(1)
    assert title.startswith("s2l report") and "PWNED" not in title
    body = re.search(r"<body[^>]*>", dom).group(0)  # what the planted code would have set
    assert "data-pwned" not in body, body
    # Each planted string is there as text: Chromium serialises text nodes with < as &lt;.
    for text in PLANTED:
        shown = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert shown in dom, text


def test_page_without_clusters_or_sweep(tmp_path: Path) -> None:
    """A run that has only ingested still gets a page (no Ray, no browser needed)."""
    import json

    from s2l_ray.stages.report_html import write_html_report

    run = tmp_path / "run"
    (run / "ingest").mkdir(parents=True)
    (run / "ingest" / "_SUCCESS.json").write_text(json.dumps({"seconds": 2.0}))
    (run / "ingest" / "report.json").write_text(json.dumps(
        {"valid": 7, "rejected": 2, "rejects": {"bad_json": 2, "<x>": 1}}))
    (run / "ingest" / "config.yaml").write_text("data:\n  source: '<b>x</b>'\n")
    page = write_html_report(run, []).read_text()
    assert "No finished cluster stage" in page and "No finished sweep" in page
    assert "&lt;x&gt;" in page and "&lt;b&gt;x&lt;/b&gt;" in page and "<x>" not in page


def test_sweep_table_is_methods_by_budgets(tmp_path: Path) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from s2l_ray.stages.report_html import render_sweep, sweep_tables

    run = tmp_path / "run"
    (run / "sweep").mkdir(parents=True)
    (run / "sweep" / "_SUCCESS.json").write_text(json.dumps({"seconds": 1.0}))
    rows = [{"method": m, "size": s, "budget": str(s), "fraction": s / 100, "seed": seed,
             "macro_em": em, "macro_loss": 2 - em}
            for m, s, seed, em in [("s2l", 10, 0, 0.5), ("s2l", 10, 1, 0.7),
                                   ("random", 10, 0, 0.4), ("s2l", 30, 0, 0.8),
                                   ("full", 100, 0, 0.9)]]
    pq.write_table(pa.Table.from_pylist(rows), run / "sweep" / "results.parquet")
    tables = sweep_tables(run)
    assert [t[0] for t in tables] == ["macro_em", "macro_loss"]
    _, labels, body = tables[0]
    assert labels == ["10 (10%)", "30 (30%)", "100 (100%)"]
    assert [r[0] for r in body] == ["random", "s2l", "full"]
    s2l = body[1]
    assert s2l[1] == f"0.600 ± {np.std([0.5, 0.7], ddof=1):.3f} [0.500, 0.700] (2 seeds)"
    assert s2l[2].startswith("0.800 ± 0.000") and s2l[3] == ""
    assert "<h3>macro_loss</h3>" in render_sweep(tables)


def test_cli_report_logs_the_page(small_run, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from s2l_ray.cli import main

    out = Path(small_run.run.output_dir)
    with caplog.at_level(logging.INFO, logger="s2l_ray"):
        assert main(["report", str(out), "--examples", "2"]) == 0
    page = out / "report" / "index.html"
    assert page.as_uri() in caplog.text
    shown = re.findall(r"<summary>(\d+) examples</summary>", page.read_text())
    assert len(shown) == small_run.cluster.k and max(map(int, shown)) == 2
