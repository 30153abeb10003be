"""The README is the product's front page: its Python blocks run as written, every `hsae <command>` its
bash blocks name is a real command, and every docs/ file it points to exists.

The Python blocks run, in order, in one temporary folder holding what they read: `runs/store` (a tiny
`hsae harvest` of the embedded MiniLM) and `runs/topk` (`hsae train --arch topk --data runs/store`),
made with the commands the README shows, on tiny settings.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from hsae.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README) if lang == language]


def test_the_readme_has_python_and_bash_blocks():
    assert blocks("python") and blocks("bash")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with runs/store and runs/topk, built with the CLI as the README says."""
    root = tmp_path_factory.mktemp("readme")
    words = ("dogs", "trees", "music", "rivers", "stone", "glass", "bread", "snow")
    (root / "docs.txt").write_text(
        "\n".join(f"Note {i}: the {a} by the {b} stayed." for i, a in enumerate(words * 12) for b in words[:2])
    )
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["harvest", "--corpus", "docs.txt", "--tokens", "800", "--out", "runs/store", "-q"]) == 0
        train = ["train", "--arch", "topk", "--data", "runs/store", "--n-latents", "64", "--k", "4"]
        assert main([*train, "--steps", "20", "--batch-size", "64", "-q", "--out", "runs/topk"]) == 0
    finally:
        os.chdir(cwd)
    return root


def test_every_python_block_runs_as_written(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    for number, code in enumerate(blocks("python"), 1):
        namespace: dict[str, object] = {"__name__": f"readme_block_{number}"}
        exec(compile(code, f"README.md python block {number}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "topk: 64 latents on d_in 384" in printed and "saelens" in printed


def _commands() -> set[str]:
    import typer

    from hsae.cli import app, load_commands

    load_commands()
    return set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


# `hsae` as a command word (not hsae.cli, hsae/..., or inside a word), then its options and the command.
HSAE_CALL = re.compile(r"(?:^|[\s;&|(`])hsae((?:\s+--?[\w-]+)*)\s+([a-z][\w-]*)")


def _named_commands() -> list[str]:
    named = []
    for body in blocks("bash"):
        for line in body.splitlines():
            line = re.sub(r"\s#.*$", "", line)  # comments say things like "the hsae serve line"
            named += [command for _, command in HSAE_CALL.findall(line)]
    return named


def test_every_hsae_command_in_the_bash_blocks_exists():
    named = _named_commands()
    assert {"harvest", "train", "eval", "serve", "import"} <= set(named)  # the parser finds them
    unknown = sorted(set(named) - _commands())
    assert not unknown, f"README names commands hsae does not have: {unknown}"


def test_every_docs_file_the_readme_names_exists():
    linked = set(re.findall(r"\]\((docs/[^)\s#]+)", README)) | set(re.findall(r"\bdocs/[\w./-]+\.(?:md|png)", README))
    assert "docs/architecture.md" in linked and "docs/browser.png" in linked
    missing = sorted(path for path in linked if not (ROOT / path).is_file())
    assert not missing, f"README points to files that do not exist: {missing}"
