"""``python -m rflow`` (and ``torchrun -m rflow train …``): the same as the ``rflow`` command."""

from .cli import main

raise SystemExit(main())
