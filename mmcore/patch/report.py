"""PatchReport: what mmcore.patch replaced, what it left and why."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class PatchReport:
    """Result of :func:`mmcore.patch`.

    replaced: ``(module name, what it became)``, one per swapped module.
    left: ``(module name, reason)``, one per module left on its original implementation.
    notes: model-wide remarks (runtime fallbacks that may happen, long-context changes).
    runtime: a :class:`mmcore.nn.call_stats.CallStats`, the counters of the patched attention
        modules' calls since the patch (eager calls; a torch.compile'd graph counts nothing):
        ``op_calls``, ``fallback_calls`` (the dense torch path) and ``fallback_reasons``.

    ``print(report)`` lists every module and the runtime counters; ``repr(report)`` is one line.
    """
    replaced: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    runtime: object = None

    @property
    def fallback_calls(self) -> int:
        """Attention calls of this model that took the dense path since the patch."""
        return self.runtime.fallback_calls if self.runtime is not None else 0

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

    def __repr__(self):
        """One line: the counts, not every module (``print(report)`` lists them)."""
        rt = self.runtime
        calls = "" if rt is None else (f", runtime: {rt.op_calls} op calls, "
                                       f"{rt.fallback_calls} dense")
        return (f"<PatchReport: {len(self.replaced)} replaced, {len(self.left)} left, "
                f"{len(self.notes)} notes{calls}>")

    def __str__(self):
        lines = [f"mmcore.patch: {len(self.replaced)} replaced, {len(self.left)} left"]
        for n, w in self.replaced:
            lines.append(f"  replaced  {n or '<root>'}: {w}")
        for n, r in self.left:
            lines.append(f"  left      {n or '<root>'}: {r}")
        for note in self.notes:
            lines.append(f"  note      {note}")
        rt = self.runtime
        if rt is not None and (rt.op_calls or rt.fallback_calls):
            lines.append(f"  runtime   {rt.op_calls} attention calls on the mmcore op, "
                         f"{rt.fallback_calls} on the dense path")
            for why, n in sorted(rt.fallback_reasons.items(), key=lambda kv: -kv[1]):
                lines.append(f"    dense   {n}x: {why}")
        return "\n".join(lines)
