import sys

from gradmon.cli import main

sys.exit(main())
