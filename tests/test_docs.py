"""The documentation a user reads from a clone or an installed copy points inside the repository."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "examples").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_link_resolves_inside_the_repository():
    bad = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+://|mailto:|#", target):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                bad.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not bad, bad


def test_no_reference_to_a_spec_outside_the_repository():
    hits = []
    for p in ROOT.rglob("*"):
        if (p.is_file() and p.suffix in (".py", ".md", ".h", ".cpp", ".cu", ".sh", ".toml") and ".git" not in p.parts
                and p != pathlib.Path(__file__).resolve()):
            text = p.read_text(errors="ignore")
            if "shared/SPEC.md" in text or re.search(r"(?<![/\w])SPEC\.md", text):
                hits.append(str(p.relative_to(ROOT)))
    assert not hits, hits
