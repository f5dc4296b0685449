"""`python -m s2l_ray ...` is the same as the `s2l` command."""

import sys

from s2l_ray.cli import main

sys.exit(main())
