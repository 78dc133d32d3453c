"""The DreamBench-style evaluation app: it drives the caching and generation jobs, then scores (``job``)."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "config": ["EvaluationConfig", "EvaluationInputError"],
    "job": ["EvaluationResult", "run_evaluation", "result_lines", "evaluation_plan", "score_images", "scores_schema"],
    "args": ["add_evaluation_arguments", "evaluation_from_args"],
})
