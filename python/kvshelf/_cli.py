"""Console entry point `kvshelf`: runs the kvshelf command shipped in the package."""

import os
import sys


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    exe = os.path.join(here, "bin", "kvshelf")
    if not os.path.isfile(exe):
        sys.stderr.write("kvshelf: the kvshelf binary is missing from the package (%s)\n" % exe)
        sys.exit(127)
    os.environ.setdefault("KVSHELF_BIN", exe)
    os.execv(exe, [exe] + sys.argv[1:])


if __name__ == "__main__":
    main()
