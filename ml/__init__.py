"""Batch retraining over the Parquet history (the lake): the training table
(:mod:`ml.table`), the models and their baselines (:mod:`ml.models`), honest walk-forward
evaluation (:mod:`ml.walkforward`), clustering of market states (:mod:`ml.cluster`) and the job
that runs them all (:mod:`ml.retrain`, ``spark-submit ml/retrain.py``; ``arbstream ml retrain``
through :mod:`ml.cli`). See ``ml/README.md``.

A component: imports core (``arbstream``) and store (``arbstream.store``) only.
"""
