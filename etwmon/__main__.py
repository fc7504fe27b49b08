"""``python -m etwmon``: the ``etwmon`` command line (see ``etwmon.cli``)."""

from .cli import main

raise SystemExit(main())
