"""Name -> factory registries. Unknown names list the known ones; duplicate registrations raise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):

  def __init__(self, kind: str):
    self.kind = kind
    self._factories: dict[str, Callable[..., T]] = {}

  def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    def decorator(factory: Callable[..., T]) -> Callable[..., T]:
      if name in self._factories:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._factories[name] = factory
      return factory
    return decorator

  def get(self, name: str) -> Callable[..., T]:
    if name not in self._factories:
      raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._factories))}")
    return self._factories[name]

  def names(self) -> list[str]:
    return sorted(self._factories)

  def __contains__(self, name: str) -> bool:
    return name in self._factories
