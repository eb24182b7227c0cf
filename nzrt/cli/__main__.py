"""``python -m nzrt.cli ...``: the same as the ``nzrt`` command."""
from .commands import main

main()
