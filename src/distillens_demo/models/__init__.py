"""Steps 2-4 of the demo: the task suite in memory (:mod:`.training_data`), the small models and their training
(:mod:`.training`), and the teacher and initial student, cached or trained (:mod:`.cached`, over the on-disk
cache in :mod:`.store`)."""
