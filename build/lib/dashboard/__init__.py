"""Read-only web dashboard and JSON API over the tasks table (`python main.py serve`)."""

from dashboard.access import Access, DashboardAccessError
from dashboard.app import create_app
from dashboard.source import DatabaseSource
from dashboard.wiring import DashboardSettings

__all__ = ["Access", "DashboardAccessError", "DashboardSettings", "DatabaseSource", "create_app"]
