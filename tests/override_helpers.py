"""Override lists for the jobs' command lines, which refuse a key given twice."""

from __future__ import annotations


def once(*groups) -> list:
    """The arguments of `groups` in order, a `key=value` override whose key was given before replacing the
    earlier one in place: a test layers its changes over a tiny preset's, and every job refuses a key given
    twice on its command line. Options and their values (`--num-labeled`, `3`) are kept as they are."""
    merged: dict = {}
    for i, arg in enumerate(arg for group in groups for arg in group):
        text = str(arg)
        merged[text.split("=", 1)[0] if "=" in text and not text.startswith("-") else i] = arg
    return list(merged.values())
