"""Test-wide settings: in CI (``CI`` set) hypothesis draws the same examples on every run, so a red build is
reproducible; elsewhere each run explores new examples."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
