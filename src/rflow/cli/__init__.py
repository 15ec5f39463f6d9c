"""The ``rflow`` command: a thin layer over the library.

Bad input -> one line on stderr starting ``rflow: error:`` and exit code 2; Ctrl-C (or SIGTERM) ->
``rflow: interrupted`` and exit code 130, with every earlier output left as it was (rflow.outputs).
torch and transformers are imported only by the commands that need them, so ``rflow --help`` and
``rflow --version`` answer at once.
"""

from __future__ import annotations

import signal
import sys
import warnings

import typer

from .. import __version__, outputs
from ..errors import RflowWarning, UserError, use_cli_names
from .common import check_all_commands, console, out

try:  # typer ≥ 0.26 carries its own parser; older releases raise click's exceptions
    from typer import TyperException as _CliError
except ImportError:  # pragma: no cover
    from click import ClickException as _CliError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="rflow: rectified-flow diffusion transformers (FLUX.1) on one GPU.")


def _register() -> None:
    from . import analyze, bench, capture, generate, plan, prune, quantize

    for mod in (generate, analyze, capture, prune, quantize, plan, bench):
        mod.register(app)
    check_all_commands(app)


_register()


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="print the version")):
    if version:
        out.print(f"rflow {__version__}")
        raise typer.Exit()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, RflowWarning):
        print(f"rflow: warning: {message}", file=sys.stderr)
    elif not issubclass(category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning)):
        print(f"rflow: warning: {category.__name__}: {str(message).splitlines()[0] if str(message) else ''}",
              file=sys.stderr)


def _on_signal(signum, frame):
    """Ctrl-C and SIGTERM: note it (so that a KeyboardInterrupt Python swallows — one raised inside a
    ``__del__`` — still stops the run before any output is swapped in), then interrupt."""
    outputs.request_interrupt()
    raise KeyboardInterrupt


def _unraisable(hook):
    def show(u) -> None:
        if isinstance(u.exc_value, KeyboardInterrupt):
            return  # noted by _on_signal; the run stops at its next check
        hook(u)
    return show


def _out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()))


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app, turning user errors into one line and exit code 2."""
    use_cli_names(True)
    outputs.start_run()
    old_handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread
            break
    old_unraisable = sys.unraisablehook
    sys.unraisablehook = _unraisable(old_unraisable)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.filterwarnings("always", category=RflowWarning)
            warnings.showwarning = _show_warning
            rc = app(args=argv, prog_name="rflow", standalone_mode=False)
        outputs.check_interrupt()
    except UserError as e:
        print(f"rflow: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return _exit(2, argv)
    except (KeyboardInterrupt, typer.Abort):
        _interrupted()
        return _exit(130, argv)
    except _CliError as e:  # usage errors: unknown option, missing argument, bad value
        if type(e).__name__ == "NoArgsIsHelpError":
            return _exit(2, argv)  # the help text was already printed
        print(f"rflow: error: {' '.join(e.format_message().split())}", file=sys.stderr)
        return _exit(2, argv)
    except OSError as e:  # unreadable input, unwritable output, disk full
        print(f"rflow: error: {' '.join(str(e).split())}", file=sys.stderr)
        return _exit(2, argv)
    except Exception as e:
        if outputs.interrupt_requested():  # a library turned the KeyboardInterrupt into its own error
            _interrupted()                 # (transformers' lazy imports raise ModuleNotFoundError)
            return _exit(130, argv)
        if not _out_of_memory(e):
            raise
        print("rflow: error: out of memory: use a smaller --size or --batch, or a narrower --dtype", file=sys.stderr)
        return _exit(2, argv)
    finally:
        use_cli_names(False)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        sys.unraisablehook = old_unraisable
        outputs.clear_interrupt()
    rc = rc if isinstance(rc, int) else 0
    if rc == 130:  # typer turns Ctrl-C inside a command into exit code 130 without a word
        _interrupted()
    return _exit(rc, argv)


def _interrupted() -> None:
    """The interrupt line; outputs already swapped in before the interrupt are named first (they are
    complete — the run stopped after writing them), everything else is as it was."""
    for path in dict.fromkeys(outputs.committed()):
        print(f"rflow: note: {path} was written before the interrupt and is complete", file=sys.stderr)
    print("rflow: interrupted", file=sys.stderr)


def _exit(code: int, argv) -> int:
    if argv is None:  # called as the console script
        sys.exit(code)
    return code


__all__ = ["app", "main", "console", "out"]
