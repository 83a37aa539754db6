"""`python -m kuiper_serve.cli ...`: the `kuiper` command without the console script."""

import sys

from kuiper_serve.cli.main import main

sys.exit(main())
