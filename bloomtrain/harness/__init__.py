"""Downstream evaluation with EleutherAI's lm-evaluation-harness: bloomtrain's model for it (``lm.py``)
over a plain or a running model (``scoring.py``), the task suites shipped with the project
(``tasks/``, ``suite.py``), the command (``cli.py``: ``python -m bloomtrain.harness``) and task scores
during training (``in_training.py``). lm-eval is an optional dependency (``pip install
'bloomtrain[eval]'``); nothing here imports it until a task runs."""
