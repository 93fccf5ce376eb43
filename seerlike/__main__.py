import sys

from seerlike.cli import main

sys.exit(main())
