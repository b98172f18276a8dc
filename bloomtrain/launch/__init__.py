"""Starting the ranks: ``python -m bloomtrain.launch`` (``cli.py``) on this machine through torchrun
(``local.py``, with ``torchrun.py`` turning torchrun's failures into one line) or as a SLURM job
(``slurm.py``) that requeues itself."""
