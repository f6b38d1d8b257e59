"""
The bytes of CPython's compact ASCII strings, as buffers: a large ASCII XCom value is uploaded straight
from its ``str`` and downloaded straight into one, with no encoded or decoded copy beside it.

An ASCII ``str`` in CPython stores its characters as one byte each, which are exactly its UTF-8
encoding, right after the object header. C extensions build strings the same way: ``PyUnicode_New``,
then fill the buffer before anyone else sees the object. Everything here checks the layout once at
import (a probe string must read back through it) and answers ``None`` where it does not hold (another
interpreter, a string that is not compact ASCII); callers then take the portable path.
"""

from __future__ import annotations

import ctypes
import sys

_PyBUF_READ = 0x100
_PyBUF_WRITE = 0x200
_HEADER = sys.getsizeof("") - 1  # sizeof(PyASCIIObject): the empty string is a header and its NUL


def _api():
    if sys.implementation.name != "cpython":
        return None
    try:
        new = ctypes.pythonapi.PyUnicode_New
        new.restype = ctypes.py_object
        new.argtypes = (ctypes.c_ssize_t, ctypes.c_uint32)
        memory = ctypes.pythonapi.PyMemoryView_FromMemory
        memory.restype = ctypes.py_object
        memory.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
    except (AttributeError, OSError):
        return None
    probe = "".join(["ascii", "-probe"])  # built at run time: a fresh compact string
    if ctypes.string_at(id(probe) + _HEADER, len(probe) + 1) != probe.encode() + b"\0":
        return None
    made = new(5, 127)
    memory(id(made) + _HEADER, 5, _PyBUF_WRITE)[:] = b"probe"
    if made != "probe" or sys.getsizeof(made) != _HEADER + 6:
        return None
    return new, memory


_API = _api()


def available() -> bool:
    return _API is not None


def view(text: str) -> memoryview | None:
    """A read-only view of ``text``'s bytes (its UTF-8 encoding) if it is a compact ASCII string; it is
    valid only while ``text`` is alive, so the caller keeps a reference for as long as it uses it."""
    if _API is None or type(text) is not str or not text.isascii() or sys.getsizeof(text) != _HEADER + len(text) + 1:
        return None
    return _API[1](id(text) + _HEADER, len(text), _PyBUF_READ)


def new(size: int) -> tuple[str, memoryview] | None:
    """A new ASCII string of ``size`` characters, not yet filled, and a writable view of them.

    The string must not be used (nor handed out) until every byte of the view is written with an ASCII
    byte (< 0x80); a string left unfilled or holding other bytes is to be dropped. The view is valid
    only while the string is alive: whoever writes through it (another thread, too) holds a reference.
    """
    if _API is None or size < 1:  # PyUnicode_New(0) is the shared empty string: never write to it
        return None
    text = _API[0](size, 127)
    return text, _API[1](id(text) + _HEADER, size, _PyBUF_WRITE)
