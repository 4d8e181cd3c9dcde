"""An MCP server for the tests that starts and never answers (it reads and says nothing)."""

import sys

for _ in sys.stdin:
    pass
