"""The README and the pages under docs/: their commands, links, API paths and example hold."""
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of ``page``."""
    found = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6} (.*)", line)):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            found.add(slug)
    return found


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(pip install -e \"\.\[dev[^\n]*)\n```", readme)
    assert len(commands) == 1, commands
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.replace("pip install -q ", "pip install ") == commands[0]


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_anchor_slugs_follow_github():
    page = ROOT / "docs" / "evaluation.md"
    assert "does-it-learn-cpu-15-minutes" in anchors(page)
    assert "evaluation-k-nn" in anchors(page)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and anchor not in anchors(linked):
            broken.append(target)
    assert not broken, broken


def documented_paths() -> set[str]:
    """Every backticked dotted ``dino_fast.…`` name in the README and docs/."""
    names = set()
    for page in PAGES:
        for code in re.findall(r"`([^`\n]+)`", page.read_text()):
            names.update(re.findall(r"(?<![\w/.-])(dino_fast(?:\.\w+)+)", code))
    return names


def resolve(name: str):
    """Import ``name`` as a module, or as an attribute of the longest importable prefix."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def test_documented_api_paths_resolve():
    names = documented_paths()
    assert {"dino_fast.training.DINOLoss", "dino_fast.profiling.DispatchCounter"} <= names
    missing = []
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    # the Changes table of the README names the old paths on purpose
    old = set(re.findall(r"^\| `(dino_fast[\w.]*)`", (ROOT / "README.md").read_text(), re.M))
    assert set(missing) <= old, sorted(set(missing) - old)
    assert old <= set(missing), old  # and they are gone


def test_readme_python_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"## From Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"loss \d+\.\d{3}, \d+ operators, 0 host syncs\n", result.stdout)


def test_documented_files_exist():
    files = set()
    for page in PAGES:
        for code in re.findall(r"`([^`\n]+)`", page.read_text()):
            files.update(re.findall(r"(?<![\w/.<-])((?:[\w.-]+/)+[\w.-]+\.(?:py|md|cpp|toml))\b",
                                    code))
    assert "dino_fast/training/step.py" in files
    old = set(re.findall(r"^\| `([\w/.]+\.py)`", (ROOT / "README.md").read_text(), re.M))
    missing = sorted(f for f in files - old if not (ROOT / f).exists())
    assert not missing, missing
