import sys

from batchtag.cli import main

sys.exit(main())
