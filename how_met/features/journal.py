"""The append-only journal of an unfinished write: the crash safety of the feature store
(``how_met.features.store``) and the file format of the compact records (``how_met.asmk.records``).

A record is a frame (magic, header length, payload length, crc32 of the header), a JSON header
and the raw bytes of its arrays. Nothing here unpickles anything.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

logger = logging.getLogger(__name__)

MAGIC = b"HMJ1"
_FRAME = struct.Struct("<4sIQI")  # magic, header bytes, payload bytes, crc32 of header
_MAX_HEADER = 1 << 20


class Journal:
    """Append-only record file. A record is a frame (magic, lengths, header checksum), a JSON
    header (type, key, attributes, array dtypes and shapes, payload checksum) and the arrays' raw
    bytes, appended with one write and handed to the OS at once: a killed process loses at most
    the record being written, which replay detects (short, or failing a checksum) and cuts off.

    repair=False (a reader): a torn last record is ignored, not cut off the file (its writer
    may still be running). Also the file format of ``how_met.asmk.records``."""

    def __init__(self, path: Path, repair: bool = True):
        self.path = path
        self.images: Dict[str, Tuple[int, dict]] = {}  # key -> (payload offset, header)
        self.attrs: dict = {}
        self.repair = repair
        self._writer = None
        self._reader = None
        if path.exists():
            self._replay()

    def _replay(self) -> None:
        size = self.path.stat().st_size
        records = []  # (record start, payload offset, payload length, header)
        with open(self.path, "rb") as fh:
            start = 0
            while start + _FRAME.size <= size:
                magic, header_len, payload_len, crc = _FRAME.unpack(fh.read(_FRAME.size))
                end = start + _FRAME.size + header_len + payload_len
                if magic != MAGIC or header_len > _MAX_HEADER or end > size:
                    break
                raw = fh.read(header_len)
                try:
                    header = json.loads(raw) if zlib.crc32(raw) == crc else None
                except (UnicodeDecodeError, json.JSONDecodeError):
                    header = None
                if not isinstance(header, dict) or header.get("type") not in ("image", "attrs"):
                    break
                records.append((start, start + _FRAME.size + header_len, payload_len, header))
                fh.seek(end)
                start = end
            # Only the last record can be torn by a kill: check its payload too (the others are
            # checked when they are read).
            if records and records[-1][2]:
                fh.seek(records[-1][1])
                if zlib.crc32(fh.read(records[-1][2])) != records[-1][3].get("crc"):
                    start = records.pop()[0]
        for _, offset, _, header in records:
            if header["type"] == "attrs":
                self.attrs.update(header["attrs"])
            else:
                self.images[str(header["key"])] = (offset, header)
        if start < size and self.repair:
            logger.warning("%s: cut off the unfinished last record (%d bytes) of an interrupted write",
                           self.path, size - start)
            with open(self.path, "r+b") as fh:
                fh.truncate(start)

    def _append(self, header: dict, payload: bytes) -> Tuple[int, dict]:
        if self._writer is None:
            self._writer = open(self.path, "ab")
        header = dict(header, crc=zlib.crc32(payload))
        raw = json.dumps(header).encode()
        offset = self._writer.tell() + _FRAME.size + len(raw)
        self._writer.write(_FRAME.pack(MAGIC, len(raw), len(payload), zlib.crc32(raw)) + raw + payload)
        self._writer.flush()  # to the OS: survives the death of this process
        return offset, header

    def add_image(self, key: str, arrays: Dict[str, np.ndarray], attrs: dict) -> None:
        header = {"type": "image", "key": key, "attrs": attrs,
                  "arrays": [[name, arr.dtype.str, list(arr.shape)] for name, arr in arrays.items()]}
        self.images[key] = self._append(header, b"".join(arr.tobytes() for arr in arrays.values()))

    def set_attrs(self, attrs: dict) -> None:
        self._append({"type": "attrs", "attrs": attrs}, b"")
        self.attrs.update(attrs)

    def read_image(self, key: str) -> Tuple[Dict[str, np.ndarray], dict]:
        offset, header = self.images[key]
        if self._writer is not None:
            self._writer.flush()
        if self._reader is None:
            self._reader = open(self.path, "rb")
        self._reader.seek(offset)
        try:
            sizes = [(name, np.dtype(dtype), [int(v) for v in shape]) for name, dtype, shape in header["arrays"]]
            payload = self._reader.read(sum(dt.itemsize * int(np.prod(shape)) for _, dt, shape in sizes))
            if zlib.crc32(payload) != header["crc"]:
                raise ValueError("checksum mismatch")
            arrays, pos = {}, 0
            for name, dt, shape in sizes:
                nbytes = dt.itemsize * int(np.prod(shape))
                arrays[name] = np.frombuffer(payload, dt, nbytes // dt.itemsize, pos).reshape(shape)
                pos += nbytes
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{self.path}: journal record of {key!r} is damaged ({exc}); "
                             f"delete the journal and rerun the extraction") from None
        return arrays, header["attrs"]

    def sync(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            os.fsync(self._writer.fileno())

    def close(self) -> None:
        for fh in (self._writer, self._reader):
            if fh is not None:
                fh.close()
        self._writer = self._reader = None

    def delete(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
