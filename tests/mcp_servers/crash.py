"""An MCP server for the tests that crashes as it starts."""

import sys

sys.exit("weather station on fire")
