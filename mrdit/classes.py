"""Class lookup: a user's text (a name, an id, a picker label, a synonym) to a class id.

Order matters where names collide: ImageNet has "Cardigan" (the corgi, 264) and "cardigan" (the
sweater, 474), so an exact match wins over a case-insensitive one, and a case-insensitive match
that fits several classes is an error naming them rather than a silent first pick.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

_LABEL = re.compile(r"^(?P<name>.*\S)\s+\((?P<id>\d+)\)$")  # "golden retriever (207)", the picker's labels


class ClassLookupError(ValueError):
    """A class text that names no class, or several; the message is meant for the user."""


def normalise(text: str) -> str:
    """Case, underscores, hyphens and repeated spaces do not matter ("Golden_Retriever" = "golden retriever")."""
    return " ".join(re.sub(r"[_\-]+", " ", text).casefold().split())


def picker_label(name: str, index: int) -> str:
    """The text the class picker shows: the name with its id, so that both can be typed to filter."""
    return f"{name} ({index})"


class ClassIndex:
    """Names (index = class id) plus optional synonyms (id -> other names), resolved in this order:
    an id ("207"), a picker label ("cardigan (474)"), the exact name, the exact synonym, then the
    normalised name or synonym when it fits exactly one class."""

    def __init__(self, names: Sequence[str], synonyms: Mapping[int, Sequence[str]] | None = None) -> None:
        self.names = list(names)
        self.exact: dict[str, int] = {}
        self.loose: dict[str, set[int]] = {}
        pairs = [(i, n) for i, n in enumerate(self.names)]
        pairs += [(int(i), s) for i, alts in (synonyms or {}).items() for s in alts]
        for i, text in pairs:
            if not 0 <= i < len(self.names):
                raise ValueError(f"synonym {text!r} names class {i}, outside 0..{len(self.names) - 1}")
            self.exact.setdefault(text, i)  # a name beats a synonym spelt the same way
            self.loose.setdefault(normalise(text), set()).add(i)

    def __len__(self) -> int:
        return len(self.names)

    def choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for a filterable dropdown: the label shows the id, the value is the name."""
        return [(picker_label(n, i), n) for i, n in enumerate(self.names)]

    def lookup(self, text: str | int) -> int:
        if isinstance(text, bool) or not isinstance(text, (str, int)):
            raise ClassLookupError(f"class must be a name or an id, got {text!r}")
        s = str(text).strip()
        if s.lstrip("-").isdigit():
            i = int(s)
            if not 0 <= i < len(self.names):
                raise ClassLookupError(f"class id {i} is out of range: this model has classes 0..{len(self.names) - 1}")
            return i
        m = _LABEL.match(s)
        if m and int(m["id"]) < len(self.names) and normalise(self.names[int(m["id"])]) == normalise(m["name"]):
            return int(m["id"])
        if s in self.exact:
            return self.exact[s]
        found = sorted(self.loose.get(normalise(s), ()))
        if len(found) == 1:
            return found[0]
        if found:
            options = ", ".join(picker_label(self.names[i], i) for i in found)
            raise ClassLookupError(f"class {text!r} fits several classes: {options}; type the exact name or the id")
        shown = ", ".join(self.names[:20]) + (", ..." if len(self.names) > 20 else "")
        raise ClassLookupError(f"unknown class {text!r}; known classes: {shown}")


def read_synonyms(path: Path) -> dict[int, list[str]]:
    """Synonyms from JSON: {"<id>": ["other name", ...]}; keys starting with "_" are notes."""
    data = json.loads(path.read_text())
    return {int(k): list(v) for k, v in data.items() if not k.startswith("_")}
