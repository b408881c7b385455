"""The agent (`meshlb join`): one mix's control plane, composed of the parts in this
package on one asyncio loop (root.py wires them)."""
from meshlb.agent.root import Agent, run_agent

__all__ = ["Agent", "run_agent"]
