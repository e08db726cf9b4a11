"""`python -m streams_service [command]`: the `chatops` CLI; with no command it serves."""

import sys

from streams_service.cli import main

sys.exit(main(sys.argv[1:] or ["serve"]))
