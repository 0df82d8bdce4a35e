import sys

from gradmon.tools.cli import main

sys.exit(main())
