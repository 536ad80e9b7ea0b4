"""The post-training dashboard: a FastAPI router and its static page (uPlot charts, vendored).

Served by the FSDP service at /dashboard and by `trl-post-training dashboard --data-dir DIR`.
"""

from .router import dashboard_router
from .sources import JobsSource, data_dir_source

__all__ = ["JobsSource", "dashboard_router", "data_dir_source"]
