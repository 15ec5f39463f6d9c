"""Every test run hashes into its own cache folder, never the user's ~/.cache/rflow."""

import os
import tempfile

os.environ.setdefault("RFLOW_CACHE_DIR", tempfile.mkdtemp(prefix="rflow-test-cache-"))
