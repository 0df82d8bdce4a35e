"""Prometheus exposition: metric schema, the collector over the agent's state, the server."""
