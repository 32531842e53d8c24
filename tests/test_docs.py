"""User-facing text points only at files users have: no references to the project's internal notes, and every
docs page named anywhere, and every repository file named in the docs, exists."""
import re
import subprocess
from pathlib import Path

from _dist_utils import REPO

# the internal notes the repository's users do not have (searched case-sensitively)
INTERNAL = ("SEEDS", "DESIGN.md")
EXCLUDED = ("benchmarks/results/", "tests/")
SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".benchmarks", "medpose.egg-info"}
DOC_PATH = re.compile(r"docs/[\w./-]+?\.md")
REPO_PATH = re.compile(r"\b(?:launch|engine|models|data_pipelines|benchmarks|kernels|tests)/[\w./-]+?\.(?:py|yaml|md|sh)\b")


def _files() -> list[str]:
    """The repository's files: tracked plus new ones git does not ignore (a walk when git is not there)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True, timeout=60).stdout
        names = [n for n in out.splitlines() if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not SKIP_DIRS & set(p.relative_to(REPO).parts)]
    return sorted(n for n in names if (REPO / n).is_file())


def _text(name: str) -> str | None:
    try:
        return (REPO / name).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary


def test_no_reference_to_internal_notes_outside_results_and_tests():
    hits = []
    for name in _files():
        if name.startswith(EXCLUDED):
            continue
        text = _text(name)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if any(word in line for word in INTERNAL):
                hits.append(f"{name}:{lineno}: {line.strip()[:100]}")
    assert not hits, "references to notes users do not have:\n" + "\n".join(hits)


def test_every_docs_path_named_in_the_repository_exists():
    named, missing = set(), []
    for name in _files():
        text = _text(name)
        if text is None or name.startswith("benchmarks/results/"):
            continue
        for path in DOC_PATH.findall(text):
            named.add(path)
            if not (REPO / path).is_file():
                missing.append(f"{name}: {path}")
    assert not missing, "docs pages named but missing:\n" + "\n".join(missing)
    # the pages exist and the code and README point at them
    assert {"docs/systems/README.md", "docs/systems/hip_us_multihipposenet.md", "docs/systems/hip_xray_efficientnet.md",
            "docs/systems/spine_disc_hourglass.md", "docs/systems/segmentation_zoo.md"} <= named


def test_docs_pages_name_existing_files_and_link_each_other():
    pages = sorted((REPO / "docs").rglob("*.md"))
    assert len(pages) >= 5
    missing = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for path in REPO_PATH.findall(text):
            if not (REPO / path).exists():
                missing.append(f"{page.relative_to(REPO)}: {path}")
        for link in re.findall(r"\]\(([^)#:]+\.md)\)", text):        # relative markdown links
            if not (page.parent / link).is_file():
                missing.append(f"{page.relative_to(REPO)}: link {link}")
    assert not missing, "\n".join(missing)
    index = (REPO / "docs" / "systems" / "README.md").read_text(encoding="utf-8")
    for page in pages:
        if page.parent.name == "systems" and page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/systems/README.md does not link {page.name}"


def test_bundled_configs_named_in_the_system_pages_exist():
    configs = {p.stem for p in (REPO / "launch" / "configs").glob("*.yaml")}
    named = set()
    for page in (REPO / "docs" / "systems").glob("*.md"):
        named |= set(re.findall(r"launch/configs/(\w+)\.yaml", page.read_text(encoding="utf-8")))
    assert named, "no bundled config named in docs/systems"
    assert named <= configs, sorted(named - configs)
    assert {"hip_demo", "xray_published", "xray_demo", "spine_published", "spine_demo", "seg_zoo"} <= named
