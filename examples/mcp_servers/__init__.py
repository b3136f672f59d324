"""MCP servers the project writes for its examples (run by the local fleet)."""
