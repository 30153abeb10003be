"""The `hsae` command line.

Each subcommand lives in its own module in this package and registers itself on `app`; modules are
discovered, so a new command is one new file. Errors of type HsaeError become one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings

import typer

from hsae.errors import HsaeError, HsaeWarning

app = typer.Typer(
    name="hsae",
    help="Hierarchical sparse autoencoders: train, evaluate and browse feature forests.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_loaded = False


def _load_commands() -> None:
    global _loaded
    if _loaded:
        return
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """hsae's own warnings as one line each; others as Python prints them."""
    if issubclass(category, HsaeWarning):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    _load_commands()
    warnings.showwarning = _show_warning
    try:
        app(args=argv, standalone_mode=False)
    except HsaeError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except typer.Exit as ex:
        return ex.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 1
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            return err.exit_code
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
