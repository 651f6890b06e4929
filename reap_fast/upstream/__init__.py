"""The drop-in for Cerebras REAP's scripts: ``python -m reap_fast.prune`` and ``python -m reap_fast.layerwise_prune``.

* :mod:`.args`: upstream's argument dataclasses and parser (plus ``ReapFastArgs``);
* :mod:`.layout`: where upstream puts observation files and pruned models;
* :mod:`.semantics`: upstream's rules that differ from reap-fast's defaults, and the notes printed where
  the drop-in deliberately differs;
* :mod:`.evaluation`: the ``--do_eval`` step;
* :mod:`.main`: the run itself, on reap-fast's observe and prune stages.
"""
