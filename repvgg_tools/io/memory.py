"""Which tensors share memory, which overlap themselves, and giving a memory-mapped tensor's pages back to the OS."""

from __future__ import annotations

import mmap as _mmap
import sys
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["element_extent", "shared_memory_keys", "tensors_in", "overlaps_itself", "release_pages"]


def element_extent(t: torch.Tensor) -> tuple[int, int]:
    """``(lowest, count)``: the offset, in elements from the view's first element, of the lowest element a (possibly
    strided) view reaches, and how many elements lie from there to the highest one it reaches."""
    lowest = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True) if st < 0)
    count = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True)) + 1
    return lowest, count


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """``[start, end)`` addresses of the bytes a (possibly strided) tensor can reach."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    lowest, count = element_extent(t)
    start = t.data_ptr() + lowest * t.element_size()
    return start, start + count * t.element_size()


def shared_memory_keys(sd: Mapping[str, torch.Tensor]) -> set[str]:
    """Keys whose bytes overlap another key's bytes (tied weights, views of one buffer that overlap).

    Tensors that are views of one flat buffer but do not overlap are not in the set: writing to one, or dropping
    its whole pages (:func:`release_pages`), leaves the others intact.
    """
    spans = sorted((*_byte_span(t), k) for k, t in sd.items() if isinstance(t, torch.Tensor) and t.numel()
                   and t.device.type != "meta")
    shared: set[str] = set()
    reach_end, reach_key = -1, None
    for start, end, key in spans:
        if start < reach_end:
            shared.update((key, reach_key))
        if end > reach_end:
            reach_end, reach_key = end, key
    return shared


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside a loaded structure (dicts, lists, tuples, sets), each once."""
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    todo = [obj]
    while todo:
        item = todo.pop()
        if isinstance(item, torch.Tensor):
            found.setdefault(id(item), item)
        elif isinstance(item, (Mapping, list, tuple, set, frozenset)) and id(item) not in seen:
            seen.add(id(item))
            todo.extend(item.values() if isinstance(item, Mapping) else item)
            if isinstance(item, Mapping):
                todo.extend(k for k in item if isinstance(k, torch.Tensor))
    return list(found.values())


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (stride 0, or strides that fold back onto each other)."""
    span = 1
    for stride, n in sorted((abs(st), n) for n, st in zip(t.shape, t.stride(), strict=True) if n > 1):
        if stride < span:
            return True
        span += stride * (n - 1)
    return False


def release_pages(tensor: torch.Tensor) -> int:
    """Give the memory pages that lie wholly inside a memory-mapped checkpoint tensor back to the OS (Linux;
    elsewhere a no-op).

    Only for tensors from :func:`load_checkpoint` with ``mmap=True`` (a private file mapping) that were never
    written, will not be read again, and share no bytes with a live tensor (see :func:`shared_memory_keys`): the
    pages are dropped from this process (reading would fetch the file's bytes again). Only the pages inside the
    tensor's own bytes are released, never the rest of its storage, so neighbours in the same buffer (or a fused
    kernel written into one) keep their pages. Lets a converter stay within the checkpoint's size of RAM.

    Returns:
        Bytes released.
    """
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or not tensor.numel():
        return 0
    start, end = _byte_span(tensor)
    page = _mmap.PAGESIZE
    first = -(-start // page) * page
    last = end // page * page
    if last - first < page:
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    madv_dontneed = 4
    if libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), madv_dontneed) != 0:
        return 0
    return last - first
