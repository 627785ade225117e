import os
import sys

# tests import the shipped top-level modules (flat layout)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
