"""`python -m junjo_backend`: the same as the `junjo-backend` command."""

import sys

from junjo_backend.cli.main import main

sys.exit(main())
