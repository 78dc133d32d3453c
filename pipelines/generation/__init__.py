"""The batch generation app: subjects x prompts x seeds -> PNG images, a versioned manifest, contact sheets.

``settings`` (config, light), ``plan`` (rows, names, the plan dataset), ``render`` (the actor), ``manifest``
(schemas and the manifest log), ``sheets`` (the contact sheet), ``args`` (the command line), ``job`` (the driver).
"""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "settings": ["GenerationJobConfig", "RenderSettings", "parse_seeds"],
    "plan": ["PlanRow", "build_plan", "explicit_plan_dataset", "image_name", "load_prompts", "plan_dataset"],
    "render": ["CacheReader", "GenerationWorker", "render_rows", "load_render_pipeline"],
    "manifest": ["read_manifest", "manifest_log", "manifest_schema", "KIND"],
    "args": ["add_generation_arguments", "config_from_args", "summary_lines"],
    "job": ["GenerationSummary", "run_generation"],
})
