"""What differs between the Pythons we support (3.10 to 3.13), in one place; stdlib only (shipped)."""

from __future__ import annotations


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)``; on 3.10, which has no notes, the same ``__notes__`` list by hand
    (tracebacks there do not print it, but callers and tests can read it)."""
    if hasattr(error, "add_note"):
        error.add_note(note)
        return
    try:
        notes = getattr(error, "__notes__", None)
        if not isinstance(notes, list):
            notes = []
            error.__notes__ = notes  # type: ignore[attr-defined]
        notes.append(note)
    except (AttributeError, TypeError):  # an exception class that takes no attributes
        pass
