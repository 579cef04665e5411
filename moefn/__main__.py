import sys

from moefn.cli import main

if __name__ == "__main__":  # not when pytest imports this module for its doctests
    sys.exit(main())
