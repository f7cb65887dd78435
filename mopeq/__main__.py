"""``python -m mopeq``: the command-line interface."""

from mopeq.cli import main

raise SystemExit(main())
