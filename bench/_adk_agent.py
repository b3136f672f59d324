"""The Google ADK reference agent of ``bench/agent_a2a.py``: an ``LlmAgent`` whose model
is ``LiteLlm`` pointed at the scripted model server, served by ADK's own
``google.adk.a2a.utils.agent_to_a2a.to_a2a`` under uvicorn.

It runs in the throwaway venv the bench makes (google-adk is never a project
dependency), so it imports nothing from this repository. With ``--mcp URL`` the agent
gets a ``McpToolset`` on that MCP server (streamable HTTP); with ``--partner CARD_URL`` an
``AgentTool`` around a ``RemoteA2aAgent`` (ADK's way to call another A2A agent as a tool).
Run: ``ADK_VENV/bin/python bench/_adk_agent.py --port P --model-base URL --instruction T``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="adk_agent")
    parser.add_argument("--model-base", required=True, help="OpenAI-compatible base URL")
    parser.add_argument("--model", default="scripted")
    parser.add_argument("--instruction", required=True)
    parser.add_argument("--mcp", default=None, help="streamable HTTP URL of an MCP server")
    parser.add_argument("--partner", default=None, help="agent card URL of a partner")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import uvicorn
    from google.adk.a2a.utils.agent_to_a2a import to_a2a
    from google.adk.agents import LlmAgent
    from google.adk.models.lite_llm import LiteLlm
    from google.genai import types

    tools: list[Any] = []
    if args.mcp:
        from google.adk.tools.mcp_tool import McpToolset, StreamableHTTPConnectionParams

        tools.append(McpToolset(connection_params=StreamableHTTPConnectionParams(url=args.mcp)))
    if args.partner:
        from google.adk.agents.remote_a2a_agent import RemoteA2aAgent
        from google.adk.tools.agent_tool import AgentTool

        partner = RemoteA2aAgent(
            name="partner", agent_card=args.partner, description="The partner agent."
        )
        tools.append(AgentTool(agent=partner))
    agent = LlmAgent(
        name=args.name,
        model=LiteLlm(model=f"openai/{args.model}", api_base=args.model_base, api_key="none"),
        instruction=args.instruction,
        generate_content_config=types.GenerateContentConfig(temperature=0.2, max_output_tokens=512),
        tools=tools,
    )
    app = to_a2a(agent, host="127.0.0.1", port=args.port)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
