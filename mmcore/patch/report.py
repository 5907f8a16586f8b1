"""PatchReport: what mmcore.patch replaced, what it left and why."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class PatchReport:
    """Result of :func:`mmcore.patch`.

    replaced: ``(module name, what it became)``, one per swapped module.
    left: ``(module name, reason)``, one per module left on its original implementation.
    notes: model-wide remarks (runtime fallbacks that may happen, long-context changes).
    """
    replaced: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)

    @property
    def replaced_names(self) -> list:
        return [n for n, _ in self.replaced]

    @property
    def left_names(self) -> list:
        return [n for n, _ in self.left]

    def reason(self, name: str):
        """The reason a module was left, or None if it was not left."""
        for n, r in self.left:
            if n == name:
                return r
        return None

    def __bool__(self):
        return bool(self.replaced)

    def __str__(self):
        lines = [f"mmcore.patch: {len(self.replaced)} replaced, {len(self.left)} left"]
        for n, w in self.replaced:
            lines.append(f"  replaced  {n or '<root>'}: {w}")
        for n, r in self.left:
            lines.append(f"  left      {n or '<root>'}: {r}")
        for note in self.notes:
            lines.append(f"  note      {note}")
        return "\n".join(lines)
