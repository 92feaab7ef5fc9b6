"""Named step statistics: fields packed into one float64 vector (one collective, one host read), read back by name.

A :class:`Fields` is a fixed layout, e.g. ``Fields(nll=1, role_nll=4)``: :meth:`Fields.zeros`
makes the vector a loss hook fills through :meth:`Fields.view` (``stats.nll = ...``), the engine
sums it over micro-batches and ranks as one tensor, and :meth:`Fields.unpack` reads a vector (or
its host values) back as ``{"nll": float, "role_nll": [4 floats]}``. The last field may have width
``None``: it takes whatever is left (a per-run width such as the expert load per layer).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch

Value = Union[float, list, torch.Tensor]


class Fields:
    """A layout of named fields in one 1-D float64 vector (width 1: a scalar field)."""

    def __init__(self, **widths: Optional[int]):
        names = list(widths)
        for name, width in widths.items():
            if width is None and name != names[-1]:
                raise ValueError(f"field {name!r}: only the last field may have a variable width")
            if width is not None and width < 1:
                raise ValueError(f"field {name!r}: width must be >= 1, got {width}")
        self.widths: Tuple[Tuple[str, Optional[int]], ...] = tuple(widths.items())
        self._slices: Dict[str, slice] = {}
        at = 0
        for name, width in self.widths:
            self._slices[name] = slice(at, None if width is None else at + width)
            at += width or 0
        self.size = at  # the fixed part's width

    def __repr__(self) -> str:
        return "Fields(" + ", ".join(f"{n}={w}" for n, w in self.widths) + ")"

    def zeros(self, device=None) -> torch.Tensor:
        """A zero vector of this layout (the variable tail empty)."""
        return torch.zeros(self.size, dtype=torch.float64, device=device)

    def view(self, vector: torch.Tensor) -> "FieldView":
        """Named read/write access to ``vector``'s fields (writes go into ``vector``)."""
        return FieldView(self, vector)

    def pack(self, **values: Value) -> torch.Tensor:
        """One float64 vector of every field's value, in layout order (tensors stay on their device)."""
        if set(values) != set(self._slices):
            raise KeyError(f"pack: expected fields {sorted(self._slices)}, got {sorted(values)}")
        parts = []
        device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), None)
        for name, width in self.widths:
            v = values[name]
            t = (v.detach().to(torch.float64) if isinstance(v, torch.Tensor)
                 else torch.tensor(v, dtype=torch.float64, device=device)).reshape(-1)
            if width is not None and t.numel() != width:
                raise ValueError(f"pack: field {name!r} has {t.numel()} values, the layout says {width}")
            parts.append(t)
        return torch.cat(parts) if parts else self.zeros(device)

    def unpack(self, values: Union[torch.Tensor, Sequence[float]]) -> Dict[str, Union[float, list]]:
        """``{name: value}`` of a packed vector (width 1: a float; otherwise a list of floats)."""
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        if len(values) < self.size or (self.widths and self.widths[-1][1] is not None and len(values) != self.size):
            raise ValueError(f"unpack: {len(values)} values for {self!r}")
        return {name: (values[self._slices[name]][0] if width == 1 else list(values[self._slices[name]]))
                for name, width in self.widths}


class FieldView:
    """Attribute access to the fields of one vector: ``view.nll`` reads a slice, ``view.nll = x`` writes it."""

    __slots__ = ("_fields", "_vector")

    def __init__(self, fields: Fields, vector: torch.Tensor):
        if vector.dim() != 1 or vector.numel() < fields.size:
            raise ValueError(f"a {fields!r} view needs a 1-D vector of >= {fields.size} values, "
                             f"got shape {tuple(vector.shape)}")
        object.__setattr__(self, "_fields", fields)
        object.__setattr__(self, "_vector", vector)

    def _slot(self, name: str) -> slice:
        try:
            return self._fields._slices[name]
        except KeyError:
            raise AttributeError(f"{self._fields!r} has no field {name!r}") from None

    def __getattr__(self, name: str) -> torch.Tensor:
        s = self._slot(name)
        part = self._vector[s]
        return part[0] if dict(self._fields.widths)[name] == 1 else part

    def __setattr__(self, name: str, value) -> None:
        s = self._slot(name)
        if dict(self._fields.widths)[name] == 1:
            self._vector[s.start] = value
        else:
            self._vector[s] = value
