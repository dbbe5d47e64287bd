#!/usr/bin/env python
"""Serve the trained models over HTTP on port 8008 (options: --help; environment: MARKETPLACE_*).

    python scripts/serve.py --image-model image-classifier --text-model text-cnn --combined-model fusion
"""

from marketplace_reco.serving.cli import main

if __name__ == "__main__":
    main()
