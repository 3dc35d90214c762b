"""The documentation holds together: every relative link in README.md, CHANGELOG.md and docs/*.md points to a file of
the repository (and its #anchor to a heading there), the README stays short, and no code, test or page sends the
reader outside the repository for its facts (they live in docs/, e.g. docs/numerics.md)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# The specification and design notes kept outside the repository; spelled so that this file does not match itself.
OUTSIDE = re.compile(r"\bS(?:PEC)\b|\bD(?:ESIGN)\.md|\.\./s(?:hared)\b|/work/s(?:hared)\b")
SCANNED = ["zimage_mlx", "tests", "docs", "benchmarks", "convert", "examples", "README.md", "CHANGELOG.md"]
SUFFIXES = {".py", ".md", ".sh", ".html", ".toml", ".txt"}


def prose(text: str) -> str:
    """The page without fenced code blocks and inline code, where brackets and '#' are not markdown."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m[1])
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_the_pages_exist():
    names = {p.name for p in PAGES}
    assert {"README.md", "CHANGELOG.md", "architecture.md", "numerics.md", "performance.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: " + "; ".join(broken)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move details to docs/ (at most 200)"


def test_nothing_points_outside_the_repository():
    hits = []
    for top in SCANNED:
        base = ROOT / top
        for path in [base] if base.is_file() else sorted(base.rglob("*")):
            if path.suffix not in SUFFIXES or not path.is_file():
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                hits += [f"{path.relative_to(ROOT)}:{n}: {m[0]}" for m in OUTSIDE.finditer(line)]
    assert not hits, "cite a doc in this repository (docs/...) or a diffusers file instead: " + "; ".join(hits)


def test_the_checker_itself(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n## First run, cache, offline\n```bash\n# not a heading\n```\n## Title\n"
                    "see [a](b.md#c), [web](https://example.com) and `[x](y.md)`\n")
    assert anchors(page) == {"title", "first-run-cache-offline", "title-1"}
    assert links(page) == ["b.md#c"]
    assert slug("Several Macs as one (`mx.distributed`)") == "several-macs-as-one-mxdistributed"
