"""tests/models: the drop-in ResNets, fuse()/unfuse(). Helpers live in rk_models_testing.py
(this directory goes on sys.path so the test files can import it)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
