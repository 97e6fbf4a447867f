"""``python -m densenet`` (and ``torchrun ... -m densenet train``): the ``densenet`` command."""

import sys

from densenet.cli import main

sys.exit(main())
