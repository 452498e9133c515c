"""``python -m stream_fm``: the ``stream-fm`` command."""

import sys

from stream_fm.ops.cli import main

sys.exit(main())
