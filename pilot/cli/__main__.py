"""``python -m pilot.cli``: the same as the ``pilot`` console command."""

from pilot.cli import main

main()
