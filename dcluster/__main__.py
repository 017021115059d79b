import sys

from dcluster.cli import main

sys.exit(main())
