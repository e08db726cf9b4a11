import sys

from streams_service.cli import main

sys.exit(main())
