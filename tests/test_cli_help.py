"""Every command's --help prints and exits 0 (help strings hold literal brackets such as
hf://owner/repo[/folder], which a markup-reading help formatter once crashed on)."""

from __future__ import annotations

import pytest
import typer

from hsae.cli import app, load_commands, main

load_commands()
COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_the_app_has_its_commands():
    assert {"harvest", "train", "eval", "import", "export", "serve"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_prints(command, capsys):
    try:
        code = main([command, "--help"])
    except SystemExit as stop:
        code = stop.code
    assert code in (0, None)
    out = capsys.readouterr().out
    assert f" {command} [OPTIONS]" in out and "--help" in out


def test_train_help_names_every_registered_family(capsys):
    import hsae

    try:
        main(["train", "--help"])
    except SystemExit:
        pass
    out = " ".join(capsys.readouterr().out.split())
    missing = [name for name in hsae.families() if name not in out]
    assert not missing, f"hsae train --help does not name {missing}"
