"""``python -m mmrag.serving.cli``: the same as the ``mmrag`` command."""

import sys

from mmrag.serving.cli import main

sys.exit(main())
