"""Property tests run with a fixed seed (``derandomize``): a test run is repeatable, and CI is
never red by luck. Explore with fresh random examples: ``HYPOTHESIS_PROFILE=explore pytest``."""

import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
