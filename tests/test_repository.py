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
# Edited in another branch today; each still says "session 12". Once one no longer does,
# test_a_file_not_yet_cleaned_is_clean fails as a reminder to drop it from here.


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
