"""Evaluation: HumanEval pass@k with model-written code run in a sandbox (`multitoken.eval.sandbox`)."""
