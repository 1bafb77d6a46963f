"""Errors a run reports to its user; kept free of heavy imports so that the CLI can catch them cheaply."""


class DivergenceError(RuntimeError):
  """The search produced a non-finite loss or architecture; the last good checkpoint is kept."""
