"""The lab: research, test and tiny-model code at the repository root, not installed with reap-fast.

The quality study (``python -m reap_lab.study``, :mod:`.study_report`, :mod:`.study_stats`), training
of the study and demo models (:mod:`.train`), the demo itself (:mod:`.demo`, run by ``reap-fast demo``),
the offline stdlib corpus (:mod:`.corpus`), the built-in tiny Qwen3-MoE (:mod:`.tiny`) and one tiny config
per family (:mod:`.families_tiny`), the record of what a result was computed on (:mod:`.environment`), and
the kernels' compile checks without a GPU (:mod:`.compile_check`). Nothing shipped imports this package
(``reap_fast/demo.py`` finds the demo by name); the tests and bench/ import it from the repository root.
"""
