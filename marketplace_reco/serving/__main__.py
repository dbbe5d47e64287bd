"""``python -m marketplace_reco.serving``: run the HTTP service (see ``cli.py``)."""

from .cli import main

main()
