"""CallStats: how many calls a drop-in layer served with an mmcore op, and how many it left to
the library's own (or a dense) path, with the reasons."""


class CallStats:
    """op_calls, fallback_calls, fallback_reasons {reason: count}.

    ``repr`` / ``print`` show the three counters, e.g.
    ``CallStats(op_calls=12, fallback_calls=1, fallback_reasons={'attention dropout': 1})``.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.op_calls = 0
        self.fallback_calls = 0
        self.fallback_reasons: dict = {}

    def fallback(self, reason):
        self.fallback_calls += 1
        self.fallback_reasons[reason] = self.fallback_reasons.get(reason, 0) + 1

    def as_dict(self):
        return {"op_calls": self.op_calls, "fallback_calls": self.fallback_calls,
                "fallback_reasons": dict(self.fallback_reasons)}

    def __repr__(self):
        return (f"CallStats(op_calls={self.op_calls}, fallback_calls={self.fallback_calls}, "
                f"fallback_reasons={self.fallback_reasons!r})")
