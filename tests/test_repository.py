"""The repository itself: short front pages, curated benchmark results, no lab-notebook leftovers.

History (dated run logs, traces, patches, the rounds of measurement) lives in git, not in the tree.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from conftest import REPO

MAX_LINES = 200
GUIDES = ("docs/kubernetes.md", "docs/astrago.md")
# Not results: what a run leaves behind, a diff, or a script that made them.
NOT_RESULTS = (".log", ".txt", ".out", ".patch", ".diff", ".gz", ".trace", ".sh", ".py")
SESSION = re.compile(r"\bsession \d+", re.IGNORECASE)


def tracked(*pathspecs: str) -> list:
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", *pathspecs], cwd=REPO, capture_output=True, text=True)
    except OSError:
        pytest.skip("git is not installed")
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [path for path in listed.stdout.split("\0") if path]


def lines_of(path: str) -> list:
    return (REPO / path).read_text(encoding="utf-8", errors="replace").splitlines()


@pytest.mark.parametrize("path", ["README.md", "README.en.md", "PERFORMANCE.md"])
def test_front_pages_are_short(path):
    assert len(lines_of(path)) <= MAX_LINES, f"{path}: {len(lines_of(path))} lines, at most {MAX_LINES}"


@pytest.mark.parametrize("readme", ["README.md", "README.en.md"])
def test_readmes_link_the_cluster_guides_on_their_first_screen(readme):
    first_screen = "\n".join(lines_of(readme)[:30])
    for guide in GUIDES:
        assert f"({guide})" in first_screen, f"{readme} does not link {guide} in its first 30 lines"


def test_benchmark_results_hold_results_only():
    results = tracked("bench/results")
    leftovers = [path for path in results if path.endswith(NOT_RESULTS)]
    assert not leftovers, f"logs, traces, patches or scripts under bench/results: {leftovers[:10]}"
    traces = [
        path for path in results if path.endswith(".json") and "traceEvents" in json.loads((REPO / path).read_text())
    ]
    assert not traces, f"profiler traces under bench/results: {traces}"


def test_benchmark_results_name_the_command_that_made_them():
    for path in tracked("bench/results/*.json"):
        result = json.loads((REPO / path).read_text())
        assert isinstance(result.get("command"), str) and "bench/" in result["command"], f"{path} has no command"


def test_docs_code_and_bench_do_not_speak_of_numbered_sessions():
    files = tracked("*.md", "bench", "resnet_ddp")
    mentions = [
        f"{path}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(lines_of(path), 1)
        if SESSION.search(line)
    ]
    assert not mentions, "\n".join(mentions[:20])


def test_the_option_reference_is_what_the_parser_says():
    from resnet_ddp.entry.options_doc import markdown

    assert (REPO / "docs" / "options.md").read_text() == markdown(), (
        "docs/options.md drifted from --help: python -m resnet_ddp.entry.options_doc > docs/options.md"
    )


def test_the_layout_page_names_every_module():
    layout = (REPO / "docs" / "layout.md").read_text()
    modules = [p for p in tracked("resnet_ddp/*.py", "resnet_ddp/*/*.py") if not p.endswith("__init__.py")]
    missing = [p for p in modules if f" {p.rsplit('/', 1)[-1]} " not in layout]
    assert modules and not missing, f"docs/layout.md does not describe {missing}"


def test_the_tests_the_docs_name_exist():
    """The promise pages (RELIABILITY.md, SCENARIOS.md, ...) name the test behind each promise."""
    named = [
        (path, match.group(1), match.group(2))
        for path in tracked("*.md", "docs/*.md")
        for match in re.finditer(r"(test_\w+\.py)::(test_\w+)", (REPO / path).read_text())
    ]
    gone = [
        f"{path}: {file}::{name}"
        for path, file, name in named
        if not (REPO / "tests" / file).exists() or f"def {name}(" not in (REPO / "tests" / file).read_text()
    ]
    assert named and not gone, "\n".join(gone)
