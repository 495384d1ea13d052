"""The documentation site (mkdocs.yml) builds with `mkdocs build --strict`, as `make docs` runs it:
no broken link or anchor, no page of docs/ left out of the nav, no reference that does not
resolve; and the Reference pages, generated from the docstrings, document the public names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Reference page -> the objects it documents (their anchors in the page's HTML).
REFERENCE = {
    "tagger": [
        "jaxtag.api.load",
        "jaxtag.api.Tagger",
        "jaxtag.api.Tagger.tag",
        "jaxtag.api.Tagger.explain",
        "jaxtag.api.convert_weights",
        "jaxtag.explain.Explanation",
        "jaxtag.explain.Explanation.plot",
        "jaxtag.errors.JaxtagError",
    ],
    "serving": [
        "jaxtag.serving.Service",
        "jaxtag.serving.Limits",
        "jaxtag.serving.WindowBatcher",
        "jaxtag.serving.ServiceError",
        "jaxtag.server.app.create_app",
        "jaxtag.server.app.serving_in_background",
        "jaxtag.server.app.listen",
    ],
    "scoring": [
        "jaxtag.scoring.WindowScorer",
        "jaxtag.scoring.Waveform",
        "jaxtag.scoring.Scored",
    ],
}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    try:
        import mkdocs  # noqa: F401
    except ModuleNotFoundError:
        pytest.fail("mkdocs is not installed: pip install -e '.[docs]' (make setup-test has it)")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner on stderr, not a warning
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out),
         "--config-file", str(REPO / "mkdocs.yml")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    problems = [line for line in built.stderr.splitlines() if re.match(r"(WARNING|ERROR)\b", line)]
    assert built.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(
        problems or built.stderr.splitlines()[-30:]
    )
    return out


def built_page(site: Path, page: Path) -> Path:
    """Where mkdocs writes docs/`page` (directory URLs: training.md -> training/index.html)."""
    stem = page.with_suffix("")
    return site / (stem.parent if stem.name == "index" else stem) / "index.html"


def test_the_site_builds_strict_with_every_page(site):
    pages = sorted(p.relative_to(REPO / "docs") for p in (REPO / "docs").rglob("*.md"))
    assert Path("reference/index.md") in pages
    for page in pages:
        assert built_page(site, page).is_file(), f"docs/{page} was not built"
    assert (site / "search" / "search_index.json").is_file()


@pytest.mark.parametrize("page", sorted(REFERENCE))
def test_the_reference_documents_the_public_names(site, page):
    html = built_page(site, Path(f"reference/{page}.md")).read_text(encoding="utf-8")
    missing = [name for name in REFERENCE[page] if f'id="{name}"' not in html]
    assert not missing, f"docs/reference/{page}.md does not document {missing}"


def test_the_reference_reads_google_style_sections(site):
    """The docstrings' `Args:` and `Raises:` sections come out as sections, not as text."""
    html = built_page(site, Path("reference/tagger.md")).read_text(encoding="utf-8")
    load = html[html.index('id="jaxtag.api.load"') : html.index('id="jaxtag.api.convert_weights"')]
    assert "Parameters:" in load and "batch_size" in load and "Args:" not in load
    html = built_page(site, Path("reference/serving.md")).read_text(encoding="utf-8")
    listen = html[html.index('id="jaxtag.server.app.listen"') :]
    assert "Raises:" in listen and "JaxtagError" in listen


def test_the_docs_tools_install_wherever_the_test_runs():
    """`make setup-test` (the `test` extra) and the Python 3.12 job install the `docs` extra."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]
    assert any(dep.startswith("mkdocs-material") for dep in extras["docs"])
    (self_dep,) = [d for d in extras["test"] if d.startswith("jaxtag[")]
    assert "docs" in self_dep[len("jaxtag[") : -1].split(",")
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    install312 = re.search(r"\$\(VENV312\)/bin/python -m pip install .* -e '\.\[(.*?)\]'", makefile)
    assert install312 and "docs" in install312.group(1).split(",")
