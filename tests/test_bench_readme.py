"""benchmarks/bench.py --readme: the generated performance table replaces exactly the text between README.md's two
marker lines, atomically, and a README without them is refused untouched."""

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


def test_readme_has_the_markers_once(bench):
    text = (ROOT / "README.md").read_text()
    assert text.count(bench.BEGIN) == 1 and text.count(bench.END) == 1
    assert text.index(bench.BEGIN) < text.index(bench.END)


def test_table_replaced_between_markers_only(bench, tmp_path):
    before, after = "# title\n\n## Performance\n\nintro\n", "\nnotes after\n## Tests\n"
    readme = tmp_path / "README.md"
    readme.write_text(f"{before}{bench.BEGIN}\n| old | table |\n{bench.END}{after}")
    bench.update_readme(readme, "| new | table |\n|---|---|\n")
    expected = f"{before}{bench.BEGIN}\n| new | table |\n|---|---|\n{bench.END}{after}"
    assert readme.read_text() == expected
    bench.update_readme(readme, "| new | table |\n|---|---|\n")   # regenerating is idempotent
    assert readme.read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]   # no temporary file left behind


@pytest.mark.parametrize("body", [
    "no markers at all\n",
    "{END}\nold\n{BEGIN}\n",                       # out of order
    "{BEGIN}\nold\n{END}\n{BEGIN}\nold\n{END}\n",  # twice
    "{BEGIN}\nold table, the end marker deleted\n",
])
def test_readme_without_proper_markers_refused_untouched(bench, tmp_path, body):
    readme = tmp_path / "README.md"
    original = body.format(BEGIN=bench.BEGIN, END=bench.END)
    readme.write_text(original)
    with pytest.raises(SystemExit, match="marker"):
        bench.update_readme(readme, "| new | table |\n")
    assert readme.read_text() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
