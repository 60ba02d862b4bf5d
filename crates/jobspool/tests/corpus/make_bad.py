#!/usr/bin/env python3
"""Regenerates the corpus of bad job files in bad/ (each file name says what is wrong with it;
the body id is the file's stem, so that only the named defect is present)."""
import os

def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF

def body(job_id, payload=b"hello world", extra=b""):
    head = (b"JOBSPOOL 1\nid " + job_id.encode() + b"\ncreated 1732350000123\npriority 0\n"
            b"run-at 1732350000123\n" + extra + b"payload " + str(len(payload)).encode() + b"\n")
    crc = crc32c(head + payload)
    return head + b"crc32c %08x\n\n" % crc + payload

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bad")
os.makedirs(here, exist_ok=True)
files = {
    "empty": b"",
    "bad-magic": b"HELLO 1\nid bad-magic\n",
    "bad-version": body("bad-version").replace(b"JOBSPOOL 1", b"JOBSPOOL 9", 1),
    "truncated": body("truncated")[:-4],
    "bad-checksum": body("bad-checksum")[:-1] + b"D",
    "trailing-bytes": body("trailing-bytes") + b"\x00\x00garbage",
    "bad-header": body("bad-header", extra=b"colour blue\n"),
    "id-mismatch": body("someone-else"),
    "zero-block": b"\x00" * 4096,
}
for name, data in files.items():
    with open(os.path.join(here, name + ".job"), "wb") as f:
        f.write(data)
with open(os.path.join(os.path.dirname(here), "good.job"), "wb") as f:
    f.write(body("good"))
