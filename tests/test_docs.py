"""The README is a front page and docs/ holds the rest: every relative link in README.md and docs/*.md
reaches a file that exists and, with `#anchor`, a heading of that file (GitHub's anchor for it); every
docs page is reachable from the README; the README stays a front page. A section moved between pages
breaks its old anchors: this is where that shows. And the docs name only what the code has: method lists are
the method table, example files, flags and routes exist, and no "not yet" about a feature the code has. Every
block a reader would run is run: by tests/test_docs_snippets.py as written, or by the tests its marker names, or
its marker says why not (tests/doc_snippets.py); and every example file is run by a test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300  # what it is, the two commands, where to start, a map, the capabilities: the rest is docs/
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (outside code fences; repeated headings get -1, -2, ...)."""
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            base = github_anchor(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            if n:
                seen[f"{base}-{n}"] = 1
    return set(seen)


def links(page: Path) -> list[str]:
    """The link targets of a page, outside code fences and inline code."""
    found, fenced = [], False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            found += LINK.findall(re.sub(r"`[^`]*`", "", line))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = ROOT / "README.md"
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(readme) if not re.match(r"^[a-z]+:", t)}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_readme_is_a_front_page() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): move the detail "
                                       "into a docs/ page and link it")


# -- the docs name only what the code has ------------------------------------------------------------------------
def doc_text() -> list[tuple[str, str]]:
    return [(str(p.relative_to(ROOT)), p.read_text()) for p in PAGES]


def test_method_lists_are_the_method_table() -> None:
    """A method list in a doc (`sft | dpo | ...`) names exactly the requestable methods, and every `method: X`
    names a method of providers/training/methods.py."""
    from providers.training.methods import METHODS

    requestable = {name for name, m in METHODS.items() if m.call}
    names = "|".join(METHODS)
    wrong = []
    for page, text in doc_text():
        for listed in re.findall(rf"\b(?:{names})(?: \| [a-z_]+)+", text):
            if set(listed.split(" | ")) != requestable:
                wrong.append(f"{page}: {listed!r} is not the requestable methods {sorted(requestable)}")
        for name in re.findall(r"(?:^|`)method: ([a-z_]+)", text, re.M):
            if name not in METHODS:
                wrong.append(f"{page}: method: {name} is no method of providers/training/methods.py")
    assert not wrong, wrong


def test_example_files_named_in_docs_exist_and_each_example_is_named() -> None:
    text = "\n".join(t for _, t in doc_text())
    named = set(re.findall(r"examples/([\w./-]*\w)", text))
    missing = [n for n in named if not (ROOT / "examples" / n).exists()]
    assert not missing, f"docs name examples/ files that do not exist: {missing}"
    unnamed = [p.name for p in sorted((ROOT / "examples").iterdir())
               if p.is_file() and not re.search(rf"(?<![\w-]){re.escape(p.name)}\b", text)]
    assert not unnamed, f"example files no doc names (README.md or docs/*.md): {unnamed}"


# Flags of other programs the docs show: lm_eval, pip, torchrun, ray, sbatch/srun, and everyone's --help.
OTHER_TOOLS_FLAGS = {"--apply_chat_template", "--tasks", "--model", "--model_args", "--constraint", "--max-restarts",
                     "--max_restarts", "--rdzv-backend", "--node-ip-address", "--cpus-per-task", "--exclusive",
                     "--gres", "--mem", "--nice", "--nodes", "--ntasks-per-node", "--no-requeue",
                     "--kill-on-bad-exit", "--help",
                     "--durations"}  # pytest


def cli_flags() -> set[str]:
    """Every flag of `trl-post-training` (typer) and of the argparse parsers in providers/, scripts/, examples/,
    benchmarks/."""
    import typer.main

    from providers.cli.app import app

    flags: set[str] = set()

    def walk(command) -> None:
        for param in command.params:
            flags.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    for path in [*ROOT.glob("providers/**/*.py"), *ROOT.glob("scripts/*"), *ROOT.glob("examples/*.py"),
                 *ROOT.glob("benchmarks/**/*.py")]:
        if path.is_file():
            text = path.read_text(errors="replace")
            flags |= set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)[\"']", text))
            if path.suffix != ".py":  # shell scripts: the flags their option loops take
                flags |= set(re.findall(r"^\s*(--[\w-]+)\)", text, re.M))
    return flags


def test_every_flag_named_in_docs_exists() -> None:
    known = cli_flags() | OTHER_TOOLS_FLAGS
    unknown = sorted({f"{page}: {flag}" for page, text in doc_text()
                      for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", text) if flag not in known})
    assert not unknown, f"flags named in docs that no parser takes: {unknown}"


ROUTE_DECORATOR = re.compile(r"\.(?:get|post|put|delete|patch|api_route)\(\s*\"(/[^\"]*)\"")


def normalized(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path.split("?")[0]).rstrip("/")


# Routes of other servers the docs show (Ray's job API), FastAPI's own, and the bare API prefix.
OTHER_ROUTES = {"/api/jobs/{}", "/api/jobs/{}/stop", "/openapi.json", "/v1"}


def test_every_route_named_in_docs_exists() -> None:
    """A route in a doc (`GET /v1/...`) ends with the path of a route the service's routers declare (their
    prefixes are mounted in front); path parameters in either may have any name (`{id}`, `ID`)."""
    declared = {normalized(p) for path in ROOT.glob("providers/**/*.py")
                for p in ROUTE_DECORATOR.findall(path.read_text()) if normalized(p)}
    unknown = []
    for page, text in doc_text():
        for route in re.findall(r"\b(?:GET|POST|PUT|DELETE|PATCH) (/[\w/{}.:-]*)", text):
            route = re.sub(r"(?<=/)[A-Z][A-Z_]*(?=/|$)", "{}", normalized(route))
            if route not in OTHER_ROUTES and not any(route == d or route.endswith(d) for d in declared):
                unknown.append(f"{page}: {route}")
    assert not unknown, f"routes named in docs that no router declares: {unknown}"


# What a doc may not call missing: each is a feature the code has (what shows it, in the test's words).
FEATURES = {"reinforcement": "OpenAI's reinforcement method runs grpo", "grpo": "the grpo method",
            "pause": "the pause routes", "resume": "the resume routes", "kto": "the kto method",
            "orpo": "the orpo method", "cpo": "the cpo method", "distill": "the distill method",
            "multi-node": "the nodes launcher", "lora": "PEFT LoRA"}


def test_no_doc_says_not_yet_about_what_the_code_has() -> None:
    from providers.training.methods import METHODS

    assert {"grpo", "kto", "orpo", "cpo", "distill"} <= set(METHODS)
    found = []
    for page, text in doc_text():
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if re.search(r"not yet|not supported|unsupported", line, re.I):
                near = " ".join(lines[i:i + 2]).lower()
                found += [f"{page}:{i + 1}: says 'not yet' near {word!r} ({why})"
                          for word, why in FEATURES.items() if re.search(rf"\b{word}\b", near)]
    assert not found, found


# -- every snippet a reader would run is run ---------------------------------------------------------------------
def test_every_runnable_block_is_run_or_says_why() -> None:
    """Each ```bash / ```python block and yaml job file of README.md and docs/ has a marker (tests/doc_snippets.py):
    `run: NAME` with a check of what it prints in tests/test_docs_snippets.py, `run by:` tests that exist, or
    `not run:` with a reason."""
    from doc_snippets import blocks, covering_tests
    from test_docs_snippets import SNIPPETS

    wrong = []
    names = [b.marker_text for b in blocks() if b.marker == "run"]
    for block in blocks():
        if block.runnable and not block.marker:
            wrong.append(f"{block.where}: a {block.language} block with no marker: put <!-- run: NAME -->, "
                         "<!-- run by: tests/FILE.py::TEST --> or <!-- not run: WHY --> on the line before it")
        elif block.marker == "run" and block.marker_text not in SNIPPETS:
            wrong.append(f"{block.where}: run: {block.marker_text} has no check in tests/test_docs_snippets.py")
        elif block.marker == "run by":
            for test in covering_tests(block) or ["(none)"]:
                file, _, name = test.partition("::")
                path = ROOT / file
                if not (path.is_file() and re.search(rf"^(?:async )?def {re.escape(name)}\(", path.read_text(), re.M)):
                    wrong.append(f"{block.where}: run by {test}: no such test")
        elif block.marker == "not run" and not block.marker_text:
            wrong.append(f"{block.where}: not run: say why")
    wrong += [f"run: {name} names {names.count(name)} blocks" for name in set(names) if names.count(name) > 1]
    wrong += [f"tests/test_docs_snippets.py SNIPPETS: {name} is no block's run: marker" for name in SNIPPETS
              if name not in names]
    assert not wrong, "\n".join(wrong)


def test_every_example_file_is_named_by_a_test() -> None:
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    unrun = [p.name for p in sorted((ROOT / "examples").iterdir()) if p.is_file() and p.name not in tests]
    assert not unrun, f"example files no test names: {unrun}"
