"""The documentation: the site builds with no broken link, every Python block of the README and of ``docs/``
runs, and every command line they show parses with its command's own argument parser.

A page's Python blocks run in order in one namespace. ``<!-- docs-test: setup CODE -->`` runs CODE before the
next block (what a reader would have defined, e.g. a batch of images); ``<!-- docs-test: skip REASON -->`` right
before a block skips it, and must give the reason (e.g. the block needs the Hugging Face Hub)."""
import argparse
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
MARK = re.compile(r"<!-- docs-test: (setup|skip)\b((?:(?!<!--).)*?)-->\s*\Z", re.S)  # the comment right before
# programs the docs show that are not this project's (installers, other projects' tools, the shell)
OTHER_PROGRAMS = {"pip", "git", "mkdocs", "bash .ci/run", "python -m pytest", "hf", "jupyter", "cd", "export"}


def python_blocks(page: Path):
    """(line, code, skip reason or None, setup code) for each ```python block of a page."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) != "python":
            continue
        before = text[:match.start()]
        mark = MARK.search(before)
        kind, body = (mark.group(1), mark.group(2).strip()) if mark else (None, "")
        line = text.count("\n", 0, match.start()) + 1
        if kind == "skip" and not body:
            raise AssertionError(f"{page.name}:{line}: a skipped block must say why (<!-- docs-test: skip REASON -->)")
        blocks.append((line, match.group(2), body if kind == "skip" else None, body if kind == "setup" else ""))
    return blocks


def pages_with_python():
    return [p for p in PAGES if python_blocks(p)]


def run_page(page: Path) -> int:
    """Runs a page's Python blocks in order in one namespace; returns how many ran (a page may skip them all,
    each with its reason)."""
    namespace = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for line, code, skip, setup in python_blocks(page):
        if setup:
            exec(compile(setup, f"{page.name}:{line} (setup)", "exec"), namespace)
        if skip is not None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. fusing a model without CCA says there is nothing to remove
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
        ran += 1
    return ran


@pytest.mark.parametrize("page", pages_with_python(), ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a block that reaches for the Hub fails at once: mark it skipped
    run_page(page)


def test_a_skip_without_reason_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n<!-- docs-test: skip -->\n```python\nraise SystemExit\n```\n")
    with pytest.raises(AssertionError, match="must say why"):
        python_blocks(page)


def test_a_failing_block_fails(tmp_path):
    """The harness is not a no-op: setup code runs, and a block that raises fails the page."""
    page = tmp_path / "page.md"
    page.write_text("<!-- docs-test: setup\nx = 1\n-->\n```python\nassert x == 2, 'wrong'\n```\n")
    with pytest.raises(AssertionError, match="wrong"):
        run_page(page)
    page.write_text("<!-- docs-test: setup\nx = 2\n-->\n```python\nassert x == 2, 'wrong'\n```\n")
    assert run_page(page) == 1


# ---- command lines ----

def shown_commands(page: Path):
    """Each command line the page shows: the lines of its shell blocks (continuations joined, prompts and output
    left out) and the inline code spans that start with one of the project's commands."""
    text = page.read_text()
    commands = []
    for match in FENCE.finditer(text):
        if match.group(1) not in ("bash", "sh", "console", ""):
            continue  # ```text shows output
        body = re.sub(r"\\\n\s*", " ", match.group(2))
        lines = body.splitlines()
        prompted = any(line.startswith("$ ") for line in lines)
        for line in lines:
            if prompted and not line.startswith("$ "):
                continue  # output of a command shown with its prompt
            line = line[2:] if line.startswith("$ ") else line
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#") and looks_like_command(line):
                commands.append(line)
    for span in re.findall(r"`([^`\n]+)`", FENCE.sub("", text)):
        if "..." in span or re.fullmatch(r"timm-scheme \w+", span):
            continue  # an elided command line, or a command named rather than shown
        if re.match(r"(bash \.ci/in-venv )?(timm-scheme |python (-m (timm_scheme|benchmarks)|examples/)|torchrun )",
                    span):
            commands.append(span)
    return commands


def looks_like_command(line: str) -> bool:
    return bool(re.match(r"[\w./-]+( |$)", line)) and not line.startswith(("patched ", "fuse_for_inference", "check:"))


def all_commands():
    return sorted({(page.name, command) for page in PAGES for command in shown_commands(page)})


class _Parsed(Exception):
    pass


@contextmanager
def parse_only():
    """Make argparse stop a program right after it has parsed its command line: the arguments are checked by the
    program's own parser (unknown flags, bad choices and types fail), and nothing runs."""
    original_args, original_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    depth = {"known": 0, "args": 0}

    def parse_args(self, args=None, namespace=None):
        depth["args"] += 1
        try:
            parsed = original_args(self, args, namespace)
        finally:
            depth["args"] -= 1
        raise _Parsed(parsed)

    def parse_known_args(self, args=None, namespace=None):
        depth["known"] += 1
        try:
            parsed = original_known(self, args, namespace)
        finally:
            depth["known"] -= 1
        if depth["known"] == 0 and depth["args"] == 0:  # a program that parses with parse_known_args itself
            raise _Parsed(parsed)
        return parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", parse_known_args):
        yield


def program_of(command: str):
    """(how to run it in this process, its arguments), or (None, the program's name) for another project's."""
    words = shlex.split(command.replace("[", "").replace("]", ""))
    if words[:2] == ["bash", ".ci/in-venv"]:
        words = words[2:]
    if words[0] == "torchrun":
        words = words[words.index("-m"):]
        words = ["python", *words]
    if words[0] == "timm-scheme" or words[:3] == ["python", "-m", "timm_scheme.cli"]:
        from timm_scheme.cli import main
        args = words[1:] if words[0] == "timm-scheme" else words[3:]
        return (lambda: main(args)), args
    if words[:2] == ["python", "-m"] and words[2].startswith("benchmarks."):
        return (lambda: runpy.run_module(words[2], run_name="__main__", alter_sys=True)), words[3:]
    if words[0] == "python" and words[1].startswith("examples/"):
        script = ROOT / words[1]
        assert script.is_file(), f"{command!r}: no file {words[1]}"
        return (lambda: runpy.run_path(str(script), run_name="__main__")), words[2:]
    return None, " ".join(words[:3] if words[:2] == ["python", "-m"] else words[:1])


@pytest.mark.parametrize("page,command", all_commands())
def test_command_line_parses(page, command, monkeypatch):
    run, args = program_of(command)
    if run is None:
        assert any(args.startswith(other) for other in OTHER_PROGRAMS), \
            f"{page}: {command!r}: not a command of this project, nor a known tool ({args})"
        return
    monkeypatch.setattr(sys, "argv", [command.split()[0], *args])
    monkeypatch.syspath_prepend(str(ROOT))
    with parse_only(), pytest.raises((_Parsed, SystemExit)) as stopped:
        run()
    if stopped.type is SystemExit:  # only --help may stop it, and with success
        assert "--help" in args and stopped.value.code in (0, None), f"{page}: {command!r} does not parse"


def test_a_wrong_flag_does_not_parse(monkeypatch):
    run, args = program_of("timm-scheme demo --no-such-flag")
    with parse_only(), pytest.raises(SystemExit):
        run()


def test_the_docs_show_the_main_commands():
    shown = {command for _, command in all_commands()}
    assert any(c.startswith("bash .ci/in-venv timm-scheme demo") for c in shown)
    assert any("examples/drop_in/run_timm_train.py" in c for c in shown)


# ---- the site ----

def test_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: no broken link or anchor, every page in the navigation, the API reference
    generated from the docstrings without a warning."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "scheme_patch" in api and "Replace every channel-mixer MLP" in api  # the docstring, rendered
    assert (tmp_path / "site" / "notebooks" / "quickstart" / "index.html").is_file()


def test_readme_links_point_at_files():
    """The README is read on its own (outside the site): every relative link and image names a file that exists."""
    text = (ROOT / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"\w+://", t)]
    assert targets
    missing = [t for t in targets if t and not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
