"""The README and docs/ stay navigable: the README is a short front page, every relative link and image resolves
(anchors included, by GitHub's rules), every page in docs/ is reachable from the README, the repository files named
in code spans exist, and every ``python -m easy_context.<module>`` names a module that runs."""

import functools
import importlib.util
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README] + DOCS
MAX_README_LINES = 300

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
PATH_EXTENSIONS = ("py", "sh", "yaml", "yml", "json")
PATH_TOKEN = re.compile(r"[\w./-]+\.(?:%s)(?=$|[\s:,;)\]'\"`])" % "|".join(PATH_EXTENSIONS))
RUN_MODULE = re.compile(r"python -m (easy_context(?:\.\w+)*)")
SKIPPED_DIRS = {".git", ".venv", ".venv-min", "outputs", "assets", "__pycache__", ".pytest_cache", "node_modules"}


def split_code(text):
    """(prose, inline code spans, fenced code blocks) of a markdown page. Prose keeps its line structure, with code
    spans blanked out, so links inside code are not taken for links."""
    prose, spans, fenced, block, in_fence = [], [], [], [], None
    for line in text.splitlines():
        m = FENCE.match(line.strip())
        if in_fence:
            if m and line.strip().startswith(in_fence):
                fenced.append("\n".join(block))
                block, in_fence = [], None
            else:
                block.append(line)
            prose.append("")
            continue
        if m:
            in_fence = m.group(1)
            prose.append("")
            continue
        spans.extend(s.group(2) for s in CODE_SPAN.finditer(line))
        prose.append(CODE_SPAN.sub(lambda s: " " * len(s.group(0)), line))
    return "\n".join(prose), spans, fenced


def github_anchor(heading):
    """The anchor GitHub gives a heading: inline markup dropped, lower case, punctuation removed (letters, digits,
    '_' and '-' stay), each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images keep their text
    text = re.sub(r"<[^>]+>", "", text)  # html tags
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    """The anchors of a page's headings (outside fenced code), numbered as GitHub numbers repeated headings."""
    found, seen, in_fence = set(), {}, None
    for line in path.read_text(encoding="utf-8").splitlines():
        m = FENCE.match(line.strip())
        if in_fence or m:
            if m and (not in_fence or line.strip().startswith(in_fence)):
                in_fence = None if in_fence else m.group(1)
            continue
        heading = re.match(r"^\s{0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$", line)
        if heading:
            base = github_anchor(heading.group(1))
            n = seen.get(base, 0)
            found.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return found


def relative_links(path):
    prose, _, _ = split_code(path.read_text(encoding="utf-8"))
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        yield target


def broken_links(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {os.path.relpath(dest, ROOT)})")
    return broken


@functools.lru_cache(maxsize=None)
def repository_basenames():
    names = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        names.update(filenames)
    return names


def is_placeholder(token):
    return (token.startswith(("/", "~", "$")) or "..." in token or any(c in token for c in "<>{}*")
            or token.split("/")[0] in ("outputs", "merged", "adapter", "assets"))


def mentioned_paths(path):
    """Repository files named in code: inline spans (.py, .sh, .yaml, .json) and fenced blocks (.py, .sh, .yaml;
    JSON names in commands' output are usually files that a run writes). A name with a '/' is a path from the
    repository root; a bare name must be some repository file's name."""
    _, spans, fenced = split_code(path.read_text(encoding="utf-8"))
    for code, extensions in [(s, PATH_EXTENSIONS) for s in spans] + [(b, PATH_EXTENSIONS[:4]) for b in fenced]:
        for token in re.split(r"[\s=]+", code):
            token = token.split("::")[0].strip("'\"(),;")
            m = PATH_TOKEN.fullmatch(token) or PATH_TOKEN.match(token)
            if not m:
                continue
            token = m.group(0)
            extension = token.rsplit(".", 1)[1]
            if extension in extensions and not is_placeholder(token) and ("/" in token or extension != "json"):
                yield token  # a bare JSON name is nearly always a file that a run writes


def test_readme_is_a_front_page():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, \
        f"README.md has {lines} lines; move detail into docs/ (at most {MAX_README_LINES})"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert not broken_links(page), f"broken links in {page.relative_to(ROOT)}: {broken_links(page)}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(README) if t.partition("#")[0]}
    missing = [str(p.relative_to(ROOT)) for p in DOCS if p.resolve() not in linked]
    assert DOCS and not missing, f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_files_exist(page):
    basenames = repository_basenames()
    missing = sorted({p for p in mentioned_paths(page)
                      if not ((ROOT / p).is_file() if "/" in p else p in basenames)})
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"


def test_every_test_file_is_described_in_testing_md():
    described = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    missing = [p.name for p in sorted((ROOT / "tests").glob("test_*.py")) if f"`{p.name}`" not in described]
    assert not missing, f"docs/testing.md does not say what these assert: {missing}"


def test_python_dash_m_modules_exist():
    modules = sorted({m for page in PAGES for m in RUN_MODULE.findall(page.read_text(encoding="utf-8"))})
    assert modules, "expected the docs to name at least one `python -m easy_context...` command"
    missing = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations is not None:  # a package runs its __main__
            spec = importlib.util.find_spec(name + ".__main__")
        if spec is None:
            missing.append(name)
    assert not missing, f"`python -m` names modules that cannot be run: {missing}"


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The helpers find a broken link, a missing anchor and a missing file, and accept GitHub's anchors."""
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Training: `train.py`\n## Ulysses, USP, and data × sequence parallelism\n"
                                       "## Tests\n## Tests\n")
    page.write_text("[a](other.md#training-trainpy) [b](other.md#ulysses-usp-and-data--sequence-parallelism) "
                    "[c](other.md#tests-1) ![img](missing.png) [d](other.md#nope) [e](gone.md)\n"
                    "`[not a link](nowhere.md)` and `tests/test_docs.py`, `tests/no_such_test.py::t`, `<dir>/x.json`\n")
    other = os.path.relpath(tmp_path / "other.md", ROOT)
    assert sorted(broken_links(page)) == ["gone.md (no such file)", "missing.png (no such file)",
                                          f"other.md#nope (no heading #nope in {other})"]
    assert list(mentioned_paths(page)) == ["tests/test_docs.py", "tests/no_such_test.py"]
