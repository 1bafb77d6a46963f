"""Errors a run reports to its user; kept free of heavy imports so that the CLI can catch them cheaply."""


class DivergenceError(RuntimeError):
  """The search produced a non-finite loss or architecture; the last good checkpoint is kept."""


class RunError(ValueError):
  """A run cannot go on for a reason its user can mend (a checkpoint of another configuration, too few
  validation batches); the CLI prints it in one line. Other errors inside a run keep their traceback."""
