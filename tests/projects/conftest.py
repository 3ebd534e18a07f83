"""Projects under projects/ are imported as their scripts do: their directory on sys.path."""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTOSEG_ROOT = os.path.join(REPO_ROOT, "projects", "ProtoSeg")

if PROTOSEG_ROOT not in sys.path:
    sys.path.insert(0, PROTOSEG_ROOT)
