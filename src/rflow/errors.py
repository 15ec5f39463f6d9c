"""One exception type for every bad input a user can give rflow, and one warning type.

The CLI prints ``UserError`` as a single line on stderr and exits with code 2; any other
exception is a bug in rflow and keeps its traceback. Messages that tell the user which option to
change name it through :func:`flag`, so the same message says ``--vae PATH`` on the command line and
``vae=PATH`` in Python.
"""

from __future__ import annotations

import warnings

_cli_names = False

# Python argument -> command-line option, where the option is not simply the argument with dashes.
_CLI_SPELLING = {"negative_prompt": "--negative", "output": "-o"}


class UserError(ValueError):
    """A bad input (path, file, option, shape) described in one line."""


class NonFiniteError(UserError):
    """The model, the data or a loss produced NaN or infinity."""


class RflowWarning(UserWarning):
    """Something the user should know that does not stop the work (printed as ``rflow: warning: …``)."""


def use_cli_names(on: bool = True) -> None:
    """Spell options as command-line flags (``--vae``) in messages; the CLI turns this on."""
    global _cli_names
    _cli_names = on


def flag(name: str, value: str = "", *, switch: bool = False) -> str:
    """How the user spells option ``name`` (a Python argument name) here: ``--name VALUE`` on the command
    line, ``name=VALUE`` in Python (``name`` alone when no value is given); ``switch`` marks an on/off
    option (``--force`` / ``force=True``)."""
    if _cli_names:
        opt = _CLI_SPELLING.get(name, "--" + name.replace("_", "-"))
        return f"{opt} {value}" if value else opt
    if switch:
        return f"{name}=True"
    return f"{name}={value}" if value else name


def warn(message: str) -> None:
    warnings.warn(message, RflowWarning, stacklevel=2)
