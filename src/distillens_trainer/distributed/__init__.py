"""Distributed helpers: FSDP2 (:mod:`.fsdp`) and DeepSpeed's CPU notice (:mod:`.quiet`)."""
