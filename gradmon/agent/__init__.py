"""The in-process runtime: hooks -> steps -> gather -> collect -> inflight -> publish.

Nothing is imported here, so that `gradmon.agent.distributed` and friends can be imported
without the whole agent (see gradmon/agent/monitor.py for how the parts are wired).
"""
