"""The Ray Serve app: a thin FastAPI ingress (``app``), generator replicas (``generator``), cross-subject batching
(``batching``), settings, the API schema and the web page (``static/``). ``import_path: pipelines.serve:build_app``."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "app": ["build_app", "run_local", "prefers_png", "error_response"],
    "settings": ["ServeSettings", "SettingsError", "resolve_api_token"],
})
