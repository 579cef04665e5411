import sys

from moefn.cli import main

sys.exit(main())
