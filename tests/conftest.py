import os
import sys

# tests import shared helpers as ``tests._helpers``; keep every run (pytest, torchrun) able to.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")
