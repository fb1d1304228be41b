"""The ``fusedrl`` command line: :mod:`fusedrl.cli.main` holds the command group
(``fusedrl = fusedrl.cli.main:main``), one module per command, and
:mod:`fusedrl.cli.common` the helpers they share. Importing the package imports no
command (``fusedrl.cli.train`` is also the Python API of a training run)."""
