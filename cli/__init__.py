"""The ``distillgate`` command line: one module per command group."""
