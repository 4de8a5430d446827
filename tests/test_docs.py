"""The documentation site builds in strict mode: every page, link, snippet and API block resolves.

Runs where the ``docs`` extra is installed (``pip install -e ".[docs]"``); skipped otherwise.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import ilvae

ROOT = Path(__file__).resolve().parent.parent


def test_docs_build_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # The API reference documents the sub-packages installed from other folders under the
    # names users import, and the pages that include repository files carry their content.
    callbacks = (site / "api" / "callbacks" / "index.html").read_text(encoding="utf-8")
    assert 'id="ilvae.callbacks.annealing.KLAnnealing"' in callbacks
    datamodules = (site / "api" / "datamodules" / "index.html").read_text(encoding="utf-8")
    assert 'id="ilvae.datamodules.toy.TwoGaussians"' in datamodules
    # RELIABILITY.md and the README's table of studies are included, not copied.
    reliability = (site / "reliability" / "index.html").read_text(encoding="utf-8")
    sections = re.findall(r"^## .*`(\S+\.py)`", (ROOT / "RELIABILITY.md").read_text(
        encoding="utf-8"), flags=re.M)
    assert sections and all(name in reliability for name in sections)
    reproduce = (site / "reproduce" / "index.html").read_text(encoding="utf-8")
    assert "checks agreeing" in reproduce



def test_citation_names_the_package_version():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    project = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(
        encoding="utf-8"), flags=re.M)
    assert citation["cff-version"] == "1.2.0"
    assert str(citation["version"]) == project.group(1) == ilvae.__version__
    assert all(ref["title"] and ref["authors"] and ref["year"] for ref in citation["references"])
