"""The CUDA sources as the host reads them: each file with its local includes inlined (what NVRTC
compiles), and the declarations the host shares with the kernels, read from that text so that each
is written once, in C: a plain struct as a NumPy structured dtype with the C layout (offsets,
padding, size), an enum's values, an integer constant.

The struct reader takes what `cuda_src/params.cuh` and `cuda_src/mask.cuh` declare: members of the
scalar types of `_SCALARS`, pointers of any type, structs declared in the same text (by name),
one-dimensional arrays of fixed size, several names per declaration (`int a, b;`,
`const unsigned char *a, *b;`) and `struct __align__(N) Name`. Anything else is an error that names
the declaration.
"""
import functools
import os
import re

import numpy as np

_SOURCE_DIRS = (
    os.path.join(os.path.dirname(__file__), "cuda_src"),                  # installed package
    os.path.join(os.path.dirname(os.path.dirname(__file__)), "cuda_src"),  # source checkout
)
_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.M)


def source_dir():
    for path in _SOURCE_DIRS:
        if os.path.isdir(path):
            return path
    raise RuntimeError(f"cupyflash: CUDA sources not found in {' or '.join(_SOURCE_DIRS)}")


@functools.lru_cache(maxsize=None)
def source(filename):
    """The file with its local includes inlined (each once), so CuPy's disk cache, which
    hashes the code it is given, sees every line the kernel depends on."""
    seen = set()

    def expand(name):
        if name in seen:
            return ""
        seen.add(name)
        with open(os.path.join(source_dir(), name)) as f:
            text = f.read().replace("#pragma once\n", "")
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(filename)


# Scalar members by C type (i64 is common.cuh's typedef), as NumPy types; each is aligned to its size.
_SCALARS = {"char": "i1", "unsigned char": "u1", "bool": "u1", "int": "i4", "unsigned": "u4", "unsigned int": "u4",
            "float": "f4", "double": "f8", "i64": "i8", "long long": "i8", "unsigned long long": "u8"}
_POINTER = np.dtype("u8")  # a 64-bit device address
_DECLARATOR = re.compile(r"(?P<type>[\w\s]*?)\s*(?P<stars>(?:\*\s*)*)(?P<name>\w+)\s*(?:\[\s*(?P<count>\d+)\s*\])?")


@functools.lru_cache(maxsize=None)
def _uncommented(text):
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def struct_dtype(text, name):
    """The NumPy structured dtype of `struct name` as the C source `text` declares it: C's member
    offsets, padding and size, nested structs as nested dtypes, pointers as uint64."""
    layout = _layout(_uncommented(text), name)
    if layout is None:
        raise ValueError(f"cupyflash: no struct {name} in the CUDA sources")
    return layout[0]


@functools.lru_cache(maxsize=None)
def _layout(text, name):
    """(dtype, alignment) of struct `name` in comment-free `text`; None where `text` declares no such struct."""
    found = re.search(r"\bstruct\s+(?:__align__\(\s*(\d+)\s*\)\s+)?%s\s*\{(.*?)\};" % re.escape(name), text, re.S)
    if found is None:
        return None
    declared_align, body = found.groups()
    if re.search(r"[{}()]", body):
        raise ValueError(f"cupyflash: struct {name} is not a plain list of members")
    names, formats, offsets = [], [], []
    offset, align = 0, int(declared_align or 1)
    for declaration in filter(None, (" ".join(d.split()) for d in body.split(";"))):
        for member, dtype, member_align, count in _members(text, name, declaration):
            offset = -(-offset // member_align) * member_align
            names.append(member)
            formats.append(dtype if count is None else (dtype, (count,)))
            offsets.append(offset)
            offset += dtype.itemsize * (count or 1)
            align = max(align, member_align)
    itemsize = -(-offset // align) * align
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": itemsize}), align


def _members(text, struct, declaration):
    """(name, dtype, alignment, array length or None) of each name a declaration declares."""
    members, base = [], None
    for part in declaration.split(","):
        parsed = _DECLARATOR.fullmatch(part.strip())
        words = parsed and [w for w in parsed["type"].split() if w not in ("const", "volatile")]
        if not parsed or bool(words) != (base is None):  # the type comes once, before the first name
            raise ValueError(f"cupyflash: struct {struct}: cannot read the declaration `{declaration};`")
        if base is None:
            base = " ".join(words)
        if parsed["stars"]:
            dtype, align = _POINTER, _POINTER.itemsize
        elif base in _SCALARS:
            dtype = np.dtype(_SCALARS[base])
            align = dtype.itemsize
        else:
            nested = _layout(text, base)
            if nested is None:
                raise ValueError(f"cupyflash: struct {struct}: unknown type `{base}` in `{declaration};`")
            dtype, align = nested
        count = parsed["count"]
        members.append((parsed["name"], dtype, align, None if count is None else int(count)))
    return members


def enum_values(text, name):
    """{enumerator: value} of `enum name` in `text`, whose enumerators all have integer values."""
    found = re.search(r"\benum\s+%s\b[^{;]*\{([^}]*)\}" % re.escape(name), _uncommented(text))
    if found is None:
        raise ValueError(f"cupyflash: no enum {name} in the CUDA sources")
    values = {}
    for entry in filter(None, (e.strip() for e in found.group(1).split(","))):
        parsed = re.fullmatch(r"(\w+)\s*=\s*(0x[0-9a-fA-F]+|\d+)", entry)
        if parsed is None:
            raise ValueError(f"cupyflash: enum {name}: cannot read `{entry}` (an enumerator with an integer value)")
        values[parsed.group(1)] = int(parsed.group(2), 0)
    return values


def constant(text, name):
    """The value of `constexpr int name = <integer>;` in `text`."""
    found = re.search(r"\bconstexpr\s+int\s+%s\s*=\s*(\d+)\s*;" % re.escape(name), _uncommented(text))
    if found is None:
        raise ValueError(f"cupyflash: no `constexpr int {name} = <integer>;` in the CUDA sources")
    return int(found.group(1))
