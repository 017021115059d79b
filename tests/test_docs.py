"""The documentation holds together: README.md stays a front page, every relative link and
#anchor in README.md and docs/*.md resolves, every repository path they name exists, every docs
page is in the index and opens with a summary, and setup.py still reads README.md as the
package's long description.

Links are checked offline: a relative link must name a file or folder of the repository, and an
anchor a heading of the Markdown file it points into, as GitHub computes the heading's id.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
FRONT_PAGE_MAX_LINES = 250

FENCE = re.compile(r"^ {0,3}(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
# A path of the repository named in prose or a command (`dcluster/harness.py`,
# configs/demo.yaml): when modules move, the pages must follow.
REPO_PATH = re.compile(r"(?<![\w/.-])((?:dcluster|tests|benchmarks|configs|slurm|launch)/[\w./-]*\w)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `#` there is a shell comment, a `[x](y)` code)."""
    lines, fenced = [], None
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence and (fenced is None or fence.group(1) == fenced):
            fenced = None if fenced else fence.group(1)
            continue
        if fenced is None:
            lines.append(line)
    return lines


def heading_text(raw: str) -> str:
    """A heading's rendered text: links give their text, code spans their content."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    return re.sub(r"<[^>]+>", "", text)


def github_slug(heading: str) -> str:
    """The id GitHub gives a heading (github-slugger): lowercase, punctuation and symbols
    dropped, letters, digits, `-` and `_` kept, each space a hyphen (runs are not merged)."""
    kept = "".join(ch for ch in heading_text(heading).strip().lower()
                   if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading id of a Markdown text; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    ids = set()
    for line in prose_lines(text):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def link_targets(text: str) -> list[str]:
    """Every link target of the prose: inline links and images, and reference definitions;
    code spans are not links."""
    targets = []
    for line in prose_lines(text):
        definition = REFERENCE_DEF.match(line)
        if definition:
            targets.append(definition.group(1))
            continue
        targets += INLINE_LINK.findall(CODE_SPAN.sub("", line))
    return targets


def broken_links(page: Path, root: Path = ROOT, pending: set[Path] = frozenset()) -> list[str]:
    """What is wrong with the page's relative links, one line each (empty when nothing is).
    Links with a scheme (https:, mailto:) are not followed: the test runs offline."""
    problems = []
    text = page.read_text(encoding="utf-8")
    for target in link_targets(text):
        if not target or SCHEME.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page.resolve()
        where = f"{page.relative_to(root)}: link {target!r}"
        if root.resolve() not in (dest, *dest.parents):
            problems.append(f"{where} leaves the repository")
        elif not dest.exists():
            if dest in pending and not anchor:
                continue
            problems.append(f"{where}: no file {dest.relative_to(root.resolve())}")
        elif anchor:
            if dest.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading with id #{anchor} in "
                                f"{dest.relative_to(root.resolve())}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_paths_named_in_the_page_exist(page):
    named = set(REPO_PATH.findall(page.read_text(encoding="utf-8")))
    assert sorted(p for p in named if not (ROOT / p).exists()) == []


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < FRONT_PAGE_MAX_LINES, (
        f"README.md has {len(lines)} lines: keep it a front page, move detail into docs/")


def test_every_docs_page_is_in_the_index_and_opens_with_a_summary():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    linked = {(DOCS / t.partition("#")[0]).resolve() for t in link_targets(index)
              if not SCHEME.match(t) and t.partition("#")[0]}
    for page in PAGES[1:]:
        if page.name != "README.md":
            assert page.resolve() in linked, f"docs/README.md does not link {page.name}"
        blocks = [b for b in page.read_text(encoding="utf-8").split("\n\n") if b.strip()]
        assert blocks[0].startswith("# ") and "\n" not in blocks[0].strip(), page.name
        assert re.match(r"[A-Za-z`\[(*]", blocks[1]) and not blocks[1].startswith(("```", "| ", "- ")), (
            f"{page.name} does not open with a summary paragraph")


def test_setup_reads_readme_as_long_description():
    shown = subprocess.run([sys.executable, "setup.py", "--long-description"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert shown.strip() == README.read_text(encoding="utf-8").strip()


def test_checker_reports_missing_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# A page\n\n## Extra pass or training pass (`clustering.features`)\n\n## Notes\n\n"
        "## Notes\n\n```bash\n# not a heading\n[not](a-link.md)\n```\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#extra-pass-or-training-pass-clusteringfeatures) "
        "[second Notes](docs/a.md#notes-1) [web](https://example.org/x.md) [self](#top)\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#not-a-heading) [pending](docs/p.md#x) "
        "`[code](nowhere.md)` [up](../outside.md)\n\n# Top\n", encoding="utf-8")
    problems = broken_links(page, root=tmp_path, pending={(tmp_path / "docs" / "p.md").resolve()})
    assert [p.split("'")[1] for p in problems] == [
        "docs/b.md", "docs/a.md#not-a-heading", "docs/p.md#x", "../outside.md"]
    assert broken_links(tmp_path / "docs" / "a.md", root=tmp_path) == []


def test_repository_paths_are_found_in_prose_and_commands():
    text = ("runs on `dcluster/harness.py` and dcluster/methods/mmdc/;\n```bash\n"
            "dcluster train configs/demo.yaml # not python -m dcluster train or runs/dcluster/x\n```")
    assert REPO_PATH.findall(text) == ["dcluster/harness.py", "dcluster/methods/mmdc",
                                      "configs/demo.yaml"]


@pytest.mark.parametrize("heading, slug", [
    ("Running on Slurm", "running-on-slurm"),
    ("Extra pass or training pass (`clustering.features`)",
     "extra-pass-or-training-pass-clusteringfeatures"),
    ("`dcluster eval linear | knn | clusters TARGET [key=value ...] [--out FILE]`",
     "dcluster-eval-linear--knn--clusters-target-keyvalue----out-file"),
    ("Data loaders (`benchmarks/bench_loader.py`)", "data-loaders-benchmarksbench_loaderpy"),
    ("DeepCluster — the paper's loop", "deepcluster--the-papers-loop"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_readme_demo_numbers_are_results_md_numbers():
    """README quotes the demo (the epoch-40 line, the first and last epochs of the table);
    docs/results.md holds the runs: the two must not drift apart (issue #32, item 7)."""
    readme = README.read_text(encoding="utf-8")
    results = (DOCS / "results.md").read_text(encoding="utf-8")
    section = results.split("## The demo (`make demo`)", 1)[1].split("\n## ", 1)[0]

    def row(label: str) -> list[str]:
        [line] = [ln for ln in section.splitlines() if ln.startswith(f"| {label} |")]
        return [cell.strip() for cell in line.strip("|").split("|")[1:]]

    nmi, probe = row("NMI(classes) of the 30 clusters"), row("kmeans-C NMI (k=10 probe)")
    quoted = re.search(r"NMI\(classes\) rose\s+from (\S+) at epoch 1 to (\S+) at epoch 40 and "
                       r"the k = 10 probe from (\S+) to (\S+) ", readme)
    assert quoted and list(quoted.groups()) == [nmi[0], nmi[-1], probe[0], probe[-1]]
    # the epoch-40 line README shows is the other CPU's run results.md gives in its text
    line = re.search(r"epoch 40/40 \| loss (\d\.\d{3})\d \|.*?NMI\(classes\) (\S+) .*?"
                     r"kmeans-C NMI (\S+) ", readme.replace("\n", " "))
    assert line, "README's epoch-40 line"
    loss, nmi40, probe40 = line.groups()
    assert re.search(rf"/ {loss}, NMI\(classes\) [\d. /]*{nmi40} and kmeans-C NMI\s[\d. /\n]*"
                     rf"{probe40} at the same epochs", section), (loss, nmi40, probe40)
