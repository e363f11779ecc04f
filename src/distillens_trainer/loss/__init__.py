"""The loss core: tensors in, tensors out (no ``Trainer``, no ``datasets``, no files).

:mod:`.spec` (the objective's settings, validated once), :mod:`.divergences` (the divergence registry),
:mod:`.lens` and :mod:`.heads` (the logit lens and LM heads), :mod:`.layer_map` (which student layer imitates
which teacher layer), :mod:`.response_tokens`, :mod:`.teacher_signals` (the one teacher interface),
:mod:`.fused` / :mod:`.fused_math` (the chunked head + divergence), :mod:`.reference` (the plain ``[N, V]``
terms), :mod:`.topk` (a teacher kept as top-k buckets), :mod:`.feature_baseline` and :mod:`.objective`.
"""
