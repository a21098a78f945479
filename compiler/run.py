"""`torchrun ... -m moedit.run`: the torchrun entry point, kept at this short name; the
code lives in moedit/runtime/launch.py."""

import sys

from moedit.runtime.launch import main

if __name__ == "__main__":
    sys.exit(main())
