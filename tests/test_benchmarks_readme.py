"""The documentation stays in step with the repository: benchmarks/README.md and README.md's results
summary are what benchmarks/report.py renders from the committed JSON, README.md stays short, and
no link in the documentation leaves the repository except to a public web address."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def load_report():
    spec = importlib.util.spec_from_file_location("benchmarks_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_readme_is_what_report_py_renders_from_the_json():
    report = load_report()
    for path, text in report.expected().items():
        assert path.read_text() == text, (
            f"{path.relative_to(ROOT)} is out of date with benchmarks/results/*.json: run python benchmarks/report.py"
        )


def test_report_check_flags_a_stale_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    report = load_report()
    stale = tmp_path / "README.md"
    stale.write_text(report.render_benchmarks().replace("| neulite |", "| neulite (edited) |", 1))
    monkeypatch.setattr(report, "BENCH_README", stale)
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(report, "TOP_README", ROOT / "README.md")
    monkeypatch.setattr(report, "expected", lambda: {stale: report.render_benchmarks()})
    assert report.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert "(edited)" in stale.read_text()  # --check writes nothing


def test_rendering_is_deterministic():
    report = load_report()
    assert report.render_benchmarks() == report.render_benchmarks()
    assert report.render_summary() == report.render_summary()


def test_old_config_keys_are_shown_in_their_method_section():
    spell = load_report().spell
    assert spell("method.lambda_scale=0.5") == "method.neulite.lambda_scale=0.5"
    assert spell("method.stage_rounds=[8,8,8]") == "method.neulite.stage_rounds=[8,8,8]"
    assert spell("method.depthfl_kd_weight=1") == "method.depthfl.kd_weight=1"
    assert spell("method.profl_window=3") == "method.profl.window=3"
    for unchanged in ("method.neulite.lambda_scale=0.5", "method.rounds=3", "method.name=fedavg", "train.lr=0.15"):
        assert spell(unchanged) == unchanged


def test_memory_pages_name_what_is_still_to_measure_and_what_recomputation_cost():
    report = load_report()

    def row(recompute: bool, plain: float | None = None) -> dict:
        stage = {"stage": 1, "step_seconds": 1.3, **({"plain_step_seconds": plain} if plain else {})}
        return {
            "label": "resnet18" + (", recomputing" if recompute else ""),
            "batch": 64,
            "recompute": recompute,
            "report": {"stages": [stage]},
        }

    assert report._unrecomputed([row(False), row(True, 1.0)]) == []
    assert "resnet18" in report._unrecomputed([row(False)])[0]
    assert report.recompute_cost([row(False)], "on the GPU") == []
    (sentence, _) = report.recompute_cost([row(False), row(True, 1.0)], "on the GPU")
    assert "on the GPU" in sentence and "median +30% over 1 stages" in sentence and "0 above +35%" in sentence


def test_the_memory_page_shows_what_a_client_at_the_target_budget_pays():
    report = load_report()
    stages = [
        {"measured_fraction_of_full": 0.2, "step_seconds": 1.0, "estimate_error": 0.01},
        {"measured_fraction_of_full": 0.34, "step_seconds": 1.5, "plain_step_seconds": 1.0, "estimate_error": 0.0},
    ]
    row = {
        "model": "resnet18",
        "blocks": "8 memory-balanced",
        "batch_size": 64,
        "budget_fraction": 0.35,
        "full": {"estimate_error": 0.0},
        "worst_stage_fraction": 0.34,
        "stages": stages,
    }
    data = {"at_budget": [row]}
    lines = report.at_budget_section(data)
    assert "| resnet18 (8 memory-balanced) | 35% | 20%, 34% (+50%) | 34% | +50% |" in lines
    assert "1 of 2 stages recompute at these budgets; 1 add more than 35% to the step." in lines
    assert report.at_budget_section({}) == []
    plain = {**data["at_budget"][0], "stages": stages[:1]}
    assert "| resnet18 (8 memory-balanced) | 35% | 20% | 20% | – |" in report.at_budget_section({"at_budget": [plain]})


def test_the_headline_says_whose_clocks_its_seconds_to_target_are():
    clocks = load_report()._clocks_sentence
    row = {"critical_path_seconds_to_target": 1.0}
    untimed = {"critical_path_seconds_to_target": None, "hosts": ["b"]}  # never reached the target: no seconds
    one = clocks({"exclusivefl": {**row, "hosts": ["a"]}, "neulite": {**row, "hosts": ["a"]}, "heterofl": untimed})
    assert one == "Machines whose clocks the seconds to target are (one machine): exclusivefl, neulite: `a`."
    mixed = clocks(
        {
            "exclusivefl": {**row, "hosts": ["a", "not recorded"]},
            "neulite": {**row, "hosts": ["b"]},
            "heterofl": untimed,
        }
    )
    assert mixed == (
        "Machines whose clocks the seconds to target are (not all recorded): exclusivefl: `a` and rounds that did "
        "not record it; neulite: `b`."
    )
    two = clocks({"exclusivefl": {**row, "hosts": ["a"]}, "neulite": {**row, "hosts": ["b"]}})
    assert two == "Machines whose clocks the seconds to target are (several machines): exclusivefl: `a`; neulite: `b`."
    assert clocks({"exclusivefl": row}) is None  # a record from before methods named their machines


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text()) <= 12_000


def test_the_documentation_pages_exist():
    for path in ("docs/method.md", "docs/flower.md", "benchmarks/README.md"):
        assert (ROOT / path).is_file(), path


def test_readme_links_the_docs():
    links = _links((ROOT / "README.md").read_text())
    for page in ("docs/method.md", "docs/flower.md", "benchmarks/README.md"):
        assert page in links, page


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _links(text: str) -> list[str]:
    prose = _prose(text)
    inline = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
    reference = re.findall(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", prose, flags=re.M)
    return inline + reference


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(
        r"^#{1,6}\s+(.+?)\s*#*\s*$",
        re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", path.read_text(), flags=re.S | re.M),
        flags=re.M,
    ):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_link_leaves_the_repository(doc: Path):
    text = doc.read_text()
    assert "../shared" not in text, f"{doc.relative_to(ROOT)} points outside the repository"
    for link in _links(text):
        if re.match(r"https?://", link):
            continue
        assert not re.match(r"[a-z][a-z0-9+.-]*:", link, flags=re.I), (
            f"{doc.relative_to(ROOT)}: {link!r} is not a public web address"
        )
        target, _, anchor = link.partition("#")
        resolved = (doc.parent / target).resolve() if target else doc
        assert not target.startswith("/"), f"{doc.relative_to(ROOT)}: {link!r} is an absolute path"
        assert resolved.is_relative_to(ROOT), f"{doc.relative_to(ROOT)}: {link!r} leaves the repository"
        assert resolved.exists(), f"{doc.relative_to(ROOT)}: {link!r} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), (
                f"{doc.relative_to(ROOT)}: {link!r} names no heading of {resolved.relative_to(ROOT)}"
            )
