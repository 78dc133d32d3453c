"""The DreamBench-style evaluation app: it drives the caching and generation jobs, then scores (``job``)."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "job": ["EvaluationConfig", "EvaluationResult", "EvaluationInputError", "run_evaluation", "evaluation_from_args",
            "result_lines", "evaluation_plan", "score_images", "scores_schema"],
    "args": ["add_evaluation_arguments"],
})
