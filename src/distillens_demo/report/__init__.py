"""Steps 5-6 of the demo: what is measured on the trained models (:mod:`.scoring`: generation scores and the
lens-divergence profile) and the figures (:mod:`.plots`)."""
