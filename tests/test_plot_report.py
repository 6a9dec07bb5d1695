"""`zopro plot` and `zopro report` on real small runs, a sweep and a comparison: valid PNG/SVG/PDF files,
error bars from the logged standard errors, the sweep's key in the legend, the paper's presets, and one
self-contained report page (every figure inline)."""

from __future__ import annotations

import base64
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from engine.export.figures import metric_figure
from engine.export.presets import preset_figure
from engine.export.sources import labelled_runs, metric_points
from tests.conftest import FAST_RECIPE, zopro
from tests.runs import finished_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_run(tmp_path_factory.mktemp("plot-run"), "fast", FAST_RECIPE)[1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plot-sweep")
    (folder / "fast.toml").write_text(FAST_RECIPE)
    target = folder / "sweep"
    result = zopro(
        "sweep",
        str(folder / "fast.toml"),
        "--grid",
        "policy.kl_coef=0.01,0.2",
        "--sweep-dir",
        str(target),
        "-q",
    )
    assert result.returncode == 0, result.stderr
    return target


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plot-compare")
    (folder / "fast.toml").write_text(FAST_RECIPE)
    result = zopro(
        "compare", str(folder / "fast.toml"), "--methods", "rloo,mezo", "--root", str(folder / "runs"), "-q"
    )
    assert result.returncode == 0, result.stderr
    (target,) = (folder / "runs").iterdir()
    return target


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def plot(*args: str) -> subprocess.CompletedProcess:
    return zopro("plot", *args)


def test_a_runs_figure_is_a_valid_png_svg_and_pdf(run, tmp_path):
    for name in ("gold.png", "gold.svg", "gold.pdf"):
        result = plot(str(run), "--metric", "eval/gold", "--x", "forward_passes", "-o", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
    width, height = png_size((tmp_path / "gold.png").read_bytes())
    assert width >= 800 and height >= 500  # 300 dpi, a single-column figure
    root = ElementTree.parse(tmp_path / "gold.svg").getroot()
    assert root.tag.endswith("svg") and len(list(root.iter("{http://www.w3.org/2000/svg}path"))) > 10
    assert (tmp_path / "gold.pdf").read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gold.pdf", "gold.png", "gold.svg"]


def test_error_bars_are_the_logged_standard_errors(run):
    xs, ys, ses = metric_points(run, "eval/gold", "step")
    assert len(xs) == 3 and all(se is not None for se in ses)
    figure = metric_figure(labelled_runs([run]), "eval/gold", "step")
    (container,) = figure.axes[0].containers
    assert container.has_yerr
    segments = container.lines[2][0].get_segments()
    assert [round(seg[1][1] - seg[0][1], 6) for seg in segments] == [round(2 * se, 6) for se in ses]


def test_a_sweeps_figure_names_its_swept_key_in_the_legend_one_colour_a_point(sweep, tmp_path):
    figure = metric_figure(labelled_runs([sweep]), "eval/reward", "step")
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["kl_coef=0.01", "kl_coef=0.2"]
    assert legend.get_title().get_text() == "fast: policy.kl_coef"
    colours = {container.lines[0].get_color() for container in figure.axes[0].containers}
    assert len(colours) == 2
    result = plot(str(sweep), "--metric", "eval/reward", "-o", str(tmp_path / "sweep.svg"))
    assert result.returncode == 0, result.stderr
    assert "kl_coef=0.2" in (tmp_path / "sweep.svg").read_text()


def test_the_compute_preset_sets_first_against_zeroth_order(comparison, tmp_path):
    runs = labelled_runs([comparison])
    assert [(r.label, r.method) for r in runs] == [("rloo", "rloo"), ("mezo", "mezo")]
    figure = preset_figure("compute", runs)
    reward, gold = figure.axes
    assert reward.get_xlabel() == "forward passes" and gold.get_title() == "gold score"
    styles = {c.get_label(): c.lines[0].get_linestyle() for c in reward.containers}
    assert styles == {"rloo": "-", "mezo": "--"}
    result = plot(str(comparison), "--preset", "compute", "-o", str(tmp_path / "compute.png"))
    assert result.returncode == 0, result.stderr
    assert png_size((tmp_path / "compute.png").read_bytes())[0] > 1500


def test_the_interplay_preset_draws_angle_successive_cosines_and_trajectories(run, tmp_path):
    figure = preset_figure("interplay", labelled_runs([run]))
    angle, successive, trajectory = figure.axes
    assert angle.get_ylabel() == "angle (degrees)" and len(angle.lines[1].get_xdata()) == 2
    assert {line.get_label() for line in trajectory.lines} >= {"run: policy", "run: reward"}
    result = plot(str(run), "--preset", "interplay", "-o", str(tmp_path / "interplay.svg"))
    assert result.returncode == 0, result.stderr
    ElementTree.parse(tmp_path / "interplay.svg")


def test_bad_input_is_refused_in_one_sentence_and_writes_nothing(run, tmp_path):
    for args, words in (
        ((str(run), "-o", str(tmp_path / "f.jpg")), "write a figure as .png, .svg, .pdf"),
        ((str(tmp_path), "-o", str(tmp_path / "f.png")), "is not a run, sweep or comparison directory"),
        ((str(run), "--metric", "eval/nope", "-o", str(tmp_path / "f.png")), "no run logged 'eval/nope'"),
        ((str(run), "--preset", "paper", "-o", str(tmp_path / "f.png")), "is not one of: compute, interplay"),
        (
            (str(run), "--x", "time", "-o", str(tmp_path / "f.png")),
            "is not one of: step, wall, forward_passes",
        ),
        ((str(run), "-o", str(tmp_path / "no" / "f.png")), "does not exist"),
    ):
        result = plot(*args)
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    bad = zopro("report", str(run), "-o", str(tmp_path / "r.pdf"))
    assert bad.returncode == 2 and ".html or .md" in bad.stderr
    assert list(tmp_path.iterdir()) == []


def inline_images(html: str) -> list[bytes]:
    return [
        base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    ]


@pytest.mark.parametrize("which", ["run", "sweep", "comparison"])
def test_a_report_is_one_page_with_every_figure_inline(which, request, tmp_path):
    source = request.getfixturevalue(which)
    result = zopro("report", str(source), "-o", str(tmp_path / "report.html"))
    assert result.returncode == 0, result.stderr
    html = (tmp_path / "report.html").read_text()
    images = inline_images(html)
    assert len(images) >= 3 and all(png_size(image)[0] > 300 for image in images)
    assert not re.search(r'(src|href)="(https?:|/|\.\.?/)', html), "the page must need no other file"
    for heading in ("Warnings", "Curves", "Hardware and software", "Recipe"):
        assert f"<h2>{heading}" in html
    assert "± " in html and "[sft]" in html
    if which == "run":
        assert "<h2>Held-out evaluation, per iteration</h2>" in html and "<td>it 1</td>" in html
        assert "<h2>Policy-reward interplay</h2>" in html and len(images) == 4
    if which == "sweep":
        assert "kl_coef=0.01" in html and "kl_coef=0.2" in html
    if which == "comparison":
        assert "<td>mezo</td>" in html and "<td>rloo</td>" in html
    markdown = zopro("report", str(source), "-o", str(tmp_path / "report.md"))
    assert markdown.returncode == 0, markdown.stderr
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# ") and text.count("](data:image/png;base64,") == len(images)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
def test_a_report_opens_in_a_headless_browser(run, tmp_path):
    zopro("report", str(run), "-o", str(tmp_path / "report.html"))
    shot = tmp_path / "report.png"
    result = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            f"file://{tmp_path / 'report.html'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), result.stderr
    assert png_size(shot.read_bytes()) == (1200, 2400)
    dom = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
            f"file://{tmp_path / 'report.html'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert dom.count("<img") == 4 and "Held-out evaluation" in dom
