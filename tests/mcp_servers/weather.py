"""An MCP server for the tests (stdio): one tool, ``forecast``."""

from mcp.server.mcpserver import MCPServer

server = MCPServer("weather")


@server.tool()
def forecast(city: str) -> str:
    """Tomorrow's weather in a city."""
    return f"{city}: 明日は晴れ"


if __name__ == "__main__":
    server.run()
