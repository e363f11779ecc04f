"""Step 1 of the demo: the procedural task suite. :mod:`.tasks` holds the task families, :mod:`.suite` the
splits, their files, exact-match scoring and the suite tokenizer. Nothing here reads the demo's settings."""
