"""What the recipe's after-training steps (the eval section, early stopping, the hub upload) need, checked by the
preflight before hours of training rather than after."""

from __future__ import annotations

from lora_sft.errors import UserError


def before_training(recipe, checked) -> list[str]:
    """What the recipe's after-training steps need, checked before hours of training rather than after:
    problem lines for `preflight.prepare`. `checked` is the checked data (None if it had errors)."""
    problems = []
    if recipe.eval.after_train and checked is not None and not checked.eval:
        problems.append(
            f"{recipe.where('eval', 'after_train')}: there is no eval split to evaluate after training; set data.eval or data.eval_fraction, or remove after_train"
        )
    if (stop := recipe.train.early_stopping) is not None:
        if checked is not None and not checked.eval:
            problems.append(
                f"{recipe.where('train', 'early_stopping')}: there is no eval split to watch; set data.eval or data.eval_fraction, or remove early_stopping"
            )
        if recipe.task != "classification" and stop.metric != "eval_loss":
            problems.append(
                f"{recipe.where('train', 'early_stopping', 'metric')}: {stop.metric} is measured for classification only; a causal_lm run is evaluated by eval_loss"
            )
    if recipe.task == "causal_lm":  # generation metrics; a classifier is scored with accuracy and F1
        from lora_sft.run.metrics import metric_problem

        for i, name in enumerate(recipe.eval.metrics):
            if problem := metric_problem(name, recipe.where("eval", "metrics", i)):
                problems.append(problem)
    if recipe.hub.repo_id:
        from lora_sft.export.hub import check_ready

        try:
            check_ready(recipe.hub.repo_id, recipe.where("hub", "repo_id"))
        except UserError as e:
            problems += e.problems
    return problems
