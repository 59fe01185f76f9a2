"""Cache: the named record a forward hands its backward (no tuple indices in the callers).

A subclass lists its ``fields``; an instance is built positionally or by name, reads by name
(``cache.mean``) and unpacks in field order (``x, weight, mean, invstd, training = cache``), so a
backward can open it in one line.  Plain Python (manual/ imports torch and math only, so not
typing.NamedTuple).

``record(trace, name, t)`` is the one helper the forwards and backwards (manual.mlp, manual.blocks,
manual.autocast) keep their traced values with.
"""


class Cache:
    fields = ()
    __slots__ = ()

    def __init__(self, *values, **named):
        if len(values) > len(self.fields):
            raise TypeError(f"{type(self).__name__}: expected at most {len(self.fields)} values, "
                            f"got {len(values)}")
        given = dict(zip(self.fields, values))
        for name, value in named.items():
            if name not in self.fields or name in given:
                raise TypeError(f"{type(self).__name__}: unexpected or repeated field {name!r}")
            given[name] = value
        for name in self.fields:
            object.__setattr__(self, name, given.get(name))

    def __iter__(self):
        return (getattr(self, name) for name in self.fields)

    def replace(self, **named):
        """A copy with the named fields set to new values."""
        values = {name: getattr(self, name) for name in self.fields}
        values.update(named)
        return type(self)(**values)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(self.fields)})"


def record(trace, name, t):
    """Keep t under name when the caller asked for a trace (a dict), else nothing."""
    if trace is not None:
        trace[name] = t
