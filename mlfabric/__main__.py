"""``python -m mlfabric`` runs the command line (used by ``cluster up`` to start daemons)."""

from mlfabric.cli import main

raise SystemExit(main())
