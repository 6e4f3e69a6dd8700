#!/usr/bin/env python3
"""Lists the tools of an mcp-orchestrator `/mcp` endpoint and calls one, with
the official MCP Python SDK (`pip install mcp`).

usage: tests/mcp_client.py [URL] [TOOL] [ARGUMENTS_JSON]
  URL        default http://127.0.0.1:8080/mcp
  TOOL       default track_order
  ARGUMENTS  default {"tracking_order_id": "ORD-10421"}
The caller key, when the project declares keys, comes from MCP_KEY.
"""
import asyncio
import json
import os
import sys

from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


def field(value, snake: str, camel: str):
    """A result's field: snake_case in SDK 2.x, camelCase in 1.x."""
    return getattr(value, snake) if hasattr(value, snake) else getattr(value, camel)


async def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/mcp"
    tool = sys.argv[2] if len(sys.argv) > 2 else "track_order"
    arguments = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {"tracking_order_id": "ORD-10421"}
    key = os.environ.get("MCP_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else None
    async with create_mcp_http_client(headers=headers) as http:
        async with streamable_http_client(url, http_client=http) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                info = await session.initialize()
                server = field(info, "server_info", "serverInfo")
                version = field(info, "protocol_version", "protocolVersion")
                print(f"server: {server.name} {server.version}, protocol {version}")
                listed = await session.list_tools()
                print(f"{len(listed.tools)} tools:")
                for listed_tool in listed.tools:
                    schema = field(listed_tool, "input_schema", "inputSchema")
                    arguments_named = ", ".join(schema.get("properties", {})) or "no arguments"
                    print(f"  {listed_tool.name}({arguments_named}): {listed_tool.description}")
                result = await session.call_tool(tool, arguments)
                failed = field(result, "is_error", "isError")
                print(f"\n{tool}({json.dumps(arguments)}) -> isError={failed}")
                print(json.dumps(field(result, "structured_content", "structuredContent"), indent=2, ensure_ascii=False))
                return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
