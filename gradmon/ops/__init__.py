"""Rendered from Config, never imported by the agent: alert rules, dashboards, Grafana push."""
