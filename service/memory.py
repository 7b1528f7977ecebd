"""This process's memory: what a version holds is measured at load, as the RSS it added.

Versions load one at a time, so the difference of the resident set before and after one version's
load (with freed memory handed back to the OS first: glibc keeps it otherwise) is that version's:
its sessions' weights, their prepacked forms and the arenas its load-time runs grew. Linux only
(``/proc/self/statm``); elsewhere the figures are absent.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """Resident set size now; None where /proc is not there."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def release_freed() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim), so RSS says what is held."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)
