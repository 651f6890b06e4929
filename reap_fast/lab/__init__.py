"""The lab: research and tiny-model code, apart from the shipped stages.

The quality study (``python -m reap_fast.lab.study``, :mod:`.study_report`, :mod:`.study_stats`), training
of the study and demo models (:mod:`.train`), the offline stdlib corpus (:mod:`.corpus`), the built-in
tiny Qwen3-MoE (:mod:`.tiny`) and one tiny config per family (:mod:`.families_tiny`), and the record of
what a result was computed on (:mod:`.environment`). Nothing shipped imports this package except
``reap_fast/demo.py``; the tests and the benchmarks use it freely.
"""
