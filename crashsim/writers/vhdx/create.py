"""Creating a new dynamic VHDX image, laid out as ``qemu-img create -f vhdx`` lays it out.

Layout: file identifier, headers at 64/128 KiB (sequence r and r+1), both region tables,
the log at 1 MiB, the BAT right after the log and the metadata right after the BAT, each
1 MiB aligned. Every BAT entry starts NOT_PRESENT, so the BAT is all zeros and the image
stays sparse however large the virtual disk is.
"""
from __future__ import annotations

import random
import uuid

from ...image import SparseImage
from .format import (BAT_GUID, HEADER_SLOTS, METADATA_GUID, MiB, REGION_TABLE_OFFSETS,
                     ZERO_GUID, Header, Metadata, RegionEntry, bat_entry_count,
                     build_file_identifier, build_metadata, build_region_table,
                     header_block, round_up)

CREATOR = "crashsim"
LOG_OFFSET = 1 * MiB
MAX_LOG_BYTES = 4095 * MiB  # the header's LogLength is 32 bits and a whole number of MiB


def random_guid(rng: random.Random) -> uuid.UUID:
    """A version-4 GUID drawn from ``rng``, so that a seed fixes every byte of an image."""
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def _check_args(virtual_size: int, block_size: int, log_size: int, logical: int,
                physical: int) -> None:
    if block_size < MiB or block_size > 256 * MiB or block_size & (block_size - 1):
        raise ValueError(f"block size {block_size} must be a power of two from 1 MiB to "
                         f"256 MiB")
    if log_size < MiB or log_size % MiB or log_size > MAX_LOG_BYTES:
        raise ValueError(f"log size {log_size} must be a positive multiple of 1 MiB, at "
                         f"most 4095 MiB")
    if logical not in (512, 4096) or physical not in (512, 4096):
        raise ValueError(f"sector sizes must be 512 or 4096 (got {logical}/{physical})")
    if virtual_size <= 0 or virtual_size % logical or virtual_size > 64 << 40:
        raise ValueError(f"virtual size {virtual_size} must be a positive multiple of the "
                         f"{logical}-byte logical sector, at most 64 TiB")


def create_image(virtual_size_bytes: int, block_size_bytes: int = MiB,
                 log_size_bytes: int = MiB, logical_sector_bytes: int = 512,
                 physical_sector_bytes: int = 4096, *, rng: random.Random | None = None,
                 creator: str = CREATOR) -> SparseImage:
    """A new, empty dynamic VHDX image. ``rng`` fixes the GUIDs and sequence numbers."""
    _check_args(virtual_size_bytes, block_size_bytes, log_size_bytes, logical_sector_bytes,
                physical_sector_bytes)
    rng = rng or random.Random(0)
    entries = bat_entry_count(virtual_size_bytes, block_size_bytes, logical_sector_bytes)
    bat_offset = LOG_OFFSET + log_size_bytes
    bat_length = round_up(entries * 8, MiB)
    meta_offset = bat_offset + bat_length
    meta_length = MiB
    img = SparseImage(meta_offset + meta_length)
    img.write(0, build_file_identifier(creator))
    seq = rng.getrandbits(32)
    header = Header(seq, random_guid(rng), random_guid(rng), ZERO_GUID, log_size_bytes,
                    LOG_OFFSET)
    for i, slot in enumerate(HEADER_SLOTS):
        img.write(slot, header_block(header.evolve(sequence_number=seq + i)))
    table = build_region_table([RegionEntry(BAT_GUID, bat_offset, bat_length),
                                RegionEntry(METADATA_GUID, meta_offset, meta_length)])
    for off in REGION_TABLE_OFFSETS:
        img.write(off, table)
    md = Metadata(block_size_bytes, virtual_size_bytes, logical_sector_bytes,
                  physical_sector_bytes, random_guid(rng))
    img.write(meta_offset, build_metadata(md))
    return img
