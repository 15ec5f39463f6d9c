"""``python -m rflow.cli``: the same as the ``rflow`` command."""

from . import main

main()
