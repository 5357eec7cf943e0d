import os
import sys

# Make the helper modules in tests/ importable (also by the spawned worker processes).
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
