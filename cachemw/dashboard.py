"""The dashboard's public home: ``Mount("/_cachemw", app=cachemw.dashboard.dashboard_app())``."""

from cachemw.observe.dashboard import dashboard_app, loopback_only

__all__ = ["dashboard_app", "loopback_only"]
