"""benchmarks/bench.py --performance-doc: the generated performance table replaces exactly the text between
docs/performance.md's two marker lines, atomically, and a file without them is refused untouched."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_under_test", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_performance_doc_has_the_markers_once(bench):
    assert bench.PERFORMANCE_DOC == ROOT / "docs" / "performance.md"
    text = bench.PERFORMANCE_DOC.read_text()
    assert text.count(bench.BEGIN) == 1 and text.count(bench.END) == 1
    assert text.index(bench.BEGIN) < text.index(bench.END)


def test_table_replaced_between_markers_only(bench, tmp_path):
    before, after = "# Performance\n\nintro\n", "\nnotes after\n## VAE decode\n"
    doc = tmp_path / "performance.md"
    doc.write_text(f"{before}{bench.BEGIN}\n| old | table |\n{bench.END}{after}")
    bench.update_doc(doc, "| new | table |\n|---|---|\n")
    expected = f"{before}{bench.BEGIN}\n| new | table |\n|---|---|\n{bench.END}{after}"
    assert doc.read_text() == expected
    bench.update_doc(doc, "| new | table |\n|---|---|\n")   # regenerating is idempotent
    assert doc.read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["performance.md"]   # no temporary file left behind


@pytest.mark.parametrize("body", [
    "no markers at all\n",
    "{END}\nold\n{BEGIN}\n",                       # out of order
    "{BEGIN}\nold\n{END}\n{BEGIN}\nold\n{END}\n",  # twice
    "{BEGIN}\nold table, the end marker deleted\n",
])
def test_file_without_proper_markers_refused_untouched(bench, tmp_path, body):
    doc = tmp_path / "performance.md"
    original = body.format(BEGIN=bench.BEGIN, END=bench.END)
    doc.write_text(original)
    with pytest.raises(SystemExit, match="marker"):
        bench.update_doc(doc, "| new | table |\n")
    assert doc.read_text() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["performance.md"]


def test_report_only_fills_the_doc_from_the_kept_measurements(bench, tmp_path):
    """`--suite --report-only --performance-doc FILE` rebuilds the table from the kept JSON, measuring nothing."""
    results = tmp_path / "RESULTS.md"
    (tmp_path / "RESULTS.json").write_text(bench.SUITE_JSON.read_text())
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n{bench.BEGIN}\nold\n{bench.END}\nkept\n")
    md = bench.main(["--suite", "--report-only", "--results", str(results), "--performance-doc", str(doc)])
    text = doc.read_text()
    assert text.startswith(f"# Performance\n{bench.BEGIN}\n") and text.endswith(f"{bench.END}\nkept\n")
    assert md.strip() in text and "old" not in text
    assert "--performance-doc" in md and "**DiT step**" in md
