"""`edge-quant run`: what is stale and the runs that rebuild it (``plan``), the worker processes that execute them
(``workers``), the launch that schedules them by memory (``launch``) and what the terminal shows (``view``)."""
