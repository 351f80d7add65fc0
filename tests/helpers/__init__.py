"""What the tests share: toy setups of the training engine (``engine_toys``), exact Gaussian teachers
(``gaussian``) and the CPU gate of accelerate's FSDP (``fsdp_on_cpu``). ``tests/`` is on the import path
of the tests (pytest's ``pythonpath``) and of the processes they start (``PYTHONPATH``, set by
``tests/conftest.py``), so a config names a toy setup as ``helpers.engine_toys:make_setup``."""
