"""Projects under projects/ are imported as their scripts do: their directory on sys.path."""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTOSEG_ROOT = os.path.join(REPO_ROOT, "projects", "ProtoSeg")
GSS_ROOT = os.path.join(REPO_ROOT, "projects", "GSS")

for _root in (PROTOSEG_ROOT, GSS_ROOT):
    if _root not in sys.path:
        sys.path.insert(0, _root)
