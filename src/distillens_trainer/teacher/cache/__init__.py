"""The offline teacher: its signals computed once (``distillens cache-teacher``) and read while training
(``DistillLensConfig(teacher_cache=...)``) instead of running the teacher.

:mod:`.format` is the on-disk layout, :mod:`.writer` builds a cache, :mod:`.reader` serves it to the trainer.
"""
