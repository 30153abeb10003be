"""The `hsae` command line.

Each subcommand lives in its own module in this package and registers itself on `app`; modules are
discovered, so a new command is one new file.

Every command fails the same way, here at its edge: one line on stderr, never a traceback. An
HsaeError (bad input, an impossible request) and an error of the operating system (full disk,
read-only folder, missing file: the path and the cause) exit with code 2; running out of memory too,
with the options that size the work; anything else is a bug in hsae and exits with code 1, its type
and message on the line. `hsae --debug ...` or HSAE_DEBUG=1 prints the traceback as well.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import traceback
import warnings

import typer

from hsae.errors import HsaeError, HsaeWarning, os_error_message

app = typer.Typer(
    name="hsae",
    help="Hierarchical sparse autoencoders: train, evaluate and browse feature forests.",
    no_args_is_help=True,
    add_completion=False,
    # Help strings hold literal brackets (hf://owner/repo[/folder]); rich would read them as markup.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

_loaded = False
# Set by the --debug option for the command being run (main resets it).
_debug = {"on": False}


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Print the traceback of an error (or set HSAE_DEBUG=1)"),
) -> None:
    """Hierarchical sparse autoencoders: train, evaluate and browse feature forests."""
    _debug["on"] = debug


def load_commands() -> None:
    """Import every command module, which registers its commands on `app`."""
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


def _fail(message: str, code: int) -> int:
    if _debug["on"] or os.environ.get("HSAE_DEBUG", "") not in ("", "0"):
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    import click

    load_commands()
    _debug["on"] = False
    warnings.showwarning = _show_warning
    try:
        app(args=argv, standalone_mode=False)
    except HsaeError as err:
        return _fail(" ".join(str(err).split()) or type(err).__name__, err.exit_code)
    except typer.Exit as ex:
        return ex.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (click.ClickException, typer.TyperException) as err:  # usage errors (typer has a click of its own)
        show = getattr(err, "show", None)
        if callable(show):
            show()
        else:
            print(f"error: {err}", file=sys.stderr)
        return int(getattr(err, "exit_code", 2))
    except OSError as err:
        return _fail(os_error_message(err), 2)
    except MemoryError:
        return _fail("out of memory; lower the sizes of the work (--n-latents, --batch-size, --tokens)", 2)
    except Exception as err:
        if type(err).__name__ == "OutOfMemoryError":  # torch's, on a GPU (a RuntimeError)
            return _fail("the GPU ran out of memory; lower --n-latents or --batch-size", 2)
        what = " ".join(str(err).split())[:300]
        return _fail(
            f"unexpected {type(err).__name__}: {what} (a bug in hsae; rerun with --debug for the traceback)", 1
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
