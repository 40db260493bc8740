"""The safetensors and .ckpt readers check every declared size against the file before allocating (issue #19 item 2).

Property tests (hypothesis): a random header never makes a reader allocate more than the file's size (traced with
tracemalloc, which sees the bytearrays tensors are read into) and never raises anything but `CheckpointError`;
a valid file of random tensors reads back exactly as the safetensors library wrote it.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stablepipe
from stablepipe.loading import single_file
from stablepipe.loading.checkpoint import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    checkpoint_keys,
    read_checkpoint,
    read_safetensors_state,
)
from stablepipe.loading.files import load_state_dict
from stablepipe.loading.lora import read_lora_file
from stablepipe.loading.textual_inversion import read_embedding_file

SLACK = 1 << 20  # what parsing a header of a few KB may allocate besides the tensors' bytes


def write_raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def bomb(path: Path) -> Path:
    """The 94-byte file of issue #19: a header claiming one 3.5 GB float32 tensor, then 8 bytes of data."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [875_000_000], "data_offsets": [0, 3_500_000_000]}},
                        separators=(",", ":")).encode().ljust(78)
    return write_raw(path, header, b"\x00" * 8)


def peak_bytes(read, *args, trace: bool = True) -> tuple[int, Exception | None]:
    """The most memory Python allocated while `read(*args)` ran, and what it raised."""
    if trace:
        tracemalloc.start()
    try:
        read(*args)
        raised = None
    except Exception as err:  # reported to the test, which says what is allowed (MemoryError included)
        raised = err
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        if trace:
            tracemalloc.stop()
    return peak, raised


def read_as_pipeline(path: Path) -> None:
    assert single_file.load_pipeline  # imported before tracing: only the reading is measured
    stablepipe.StableDiffusionPipeline.from_single_file(path)


def read_lora(path: Path) -> None:
    read_lora_file(path, weight_name=None, hub_kwargs={})


def read_embedding(path: Path) -> None:
    read_embedding_file(path, weight_name=None, hub_kwargs={})


READERS = {  # every path a safetensors file takes into stablepipe
    "read_safetensors_state": (read_safetensors_state, CheckpointError),
    "read_checkpoint": (read_checkpoint, CheckpointError),
    "checkpoint_keys": (checkpoint_keys, CheckpointError),
    "load_state_dict (folders)": (lambda p: load_state_dict([p]), OSError),
    "from_single_file": (read_as_pipeline, CheckpointError),
    "LoRA": (read_lora, CheckpointError),
    "embedding": (read_embedding, CheckpointError),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_the_94_byte_file_is_refused_without_allocating(tmp_path, reader):
    path = bomb(tmp_path / "bomb.safetensors")
    assert path.stat().st_size == 94
    read, error = READERS[reader]
    peak_bytes(read, path, trace=False)  # untraced first: modules imported on first use are not reading
    peak, raised = peak_bytes(read, path)
    assert isinstance(raised, error), repr(raised)
    assert "ends inside tensor 'w'" in str(raised) and "3500000000" in str(raised) and "bomb.safetensors" in str(raised)
    assert peak < SLACK, f"{reader} allocated {peak} bytes for a 94-byte file"


CASES = [  # header -> what the error says
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "has 4 bytes but its shape [2] of F32 needs 8"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "not a list of at most 64 non-negative"),
    ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, "has shape 2, not a list"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "end before they begin"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, "not two non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "not a list of at most 64"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, "dtype Q4, which stablepipe does not read"),
    ({"a": [1, 2]}, "tensor 'a' is described by a JSON array"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "tensors 'a' and 'b' overlap"),
    ({"__metadata__": {"steps": 3}}, "__metadata__ is not an object of strings"),
    ([1, 2, 3], "header is a JSON array, not an object"),
]


@pytest.mark.parametrize(("header", "message"), CASES, ids=[c[1][:30] for c in CASES])
def test_each_inconsistent_header_is_named(tmp_path, header, message):
    path = write_raw(tmp_path / "w.safetensors", json.dumps(header).encode(), b"\x00" * 16)
    with pytest.raises(CheckpointError, match="w.safetensors is not a readable safetensors file") as info:
        read_safetensors_state(path)
    assert message in str(info.value)


def test_header_length_and_json_are_checked(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="header length 1000000000000 is not plausible for a file of 10 bytes"):
        read_safetensors_state(path)
    write_raw(path, b'{"a": ')
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        read_safetensors_state(path)
    write_raw(path, b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        read_safetensors_state(path)


# ---- property tests --------------------------------------------------------------------------------------------

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
ints = st.one_of(st.integers(0, 64), st.integers(-(2**70), 2**70), st.booleans())
anything = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from([*SAFETENSORS_DTYPES, "F8_E4M3", "f32"]), anything),
        "shape": st.one_of(st.lists(ints, max_size=4), anything),
        "data_offsets": st.one_of(st.lists(ints, min_size=2, max_size=2), st.lists(ints, max_size=3), anything),
    },
)
headers = st.dictionaries(names, st.one_of(entry, anything), max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers, data_size=st.integers(0, 256), declared_extra=st.integers(-8, 8))
def test_random_headers_never_allocate_beyond_the_file_nor_raise_raw_errors(tmp_path, header, data_size,
                                                                           declared_extra):
    raw = json.dumps(header).encode()
    path = tmp_path / "random.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(raw) + declared_extra)) + raw + b"\x01" * data_size)
    peak, raised = peak_bytes(read_safetensors_state, path)
    assert raised is None or isinstance(raised, CheckpointError), repr(raised)
    assert peak < path.stat().st_size + SLACK


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512))
def test_random_bytes_are_refused_cleanly(tmp_path, data):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(data)
    peak, raised = peak_bytes(read_safetensors_state, path)
    assert raised is None or isinstance(raised, CheckpointError), repr(raised)
    assert peak < len(data) + SLACK


TORCH_DTYPES = sorted(set(SAFETENSORS_DTYPES.values()), key=str)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.dictionaries(names.filter(lambda n: n != "__metadata__"),
                              st.tuples(st.sampled_from(TORCH_DTYPES), st.lists(st.integers(0, 5), max_size=3)),
                              max_size=4))
def test_valid_files_read_back_as_the_library_wrote_them(tmp_path, shapes):
    from safetensors.torch import save_file

    tensors = {name: (torch.arange(max(1, torch.Size(shape).numel())) % 7)[: torch.Size(shape).numel()]
               .reshape(shape).to(kind) for name, (kind, shape) in shapes.items()}
    path = tmp_path / "valid.safetensors"
    save_file(tensors, str(path))
    got = read_safetensors_state(path)
    assert set(got) == set(tensors)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape and torch.equal(got[name], tensor)


# ---- .ckpt zip members -------------------------------------------------------------------------------------------


def forge_member_size(path: Path, member: str, size: int) -> None:
    """Rewrite the declared (local and central directory) sizes of one stored zip member."""
    raw = bytearray(path.read_bytes())
    name = member.encode()
    for signature, sizes_at, name_length_at, name_at in ((b"PK\x01\x02", 20, 28, 46), (b"PK\x03\x04", 18, 26, 30)):
        i = raw.find(signature)
        while i != -1:
            length = struct.unpack_from("<H", raw, i + name_length_at)[0]
            if raw[i + name_at: i + name_at + length] == name:
                struct.pack_into("<II", raw, i + sizes_at, size, size)
            i = raw.find(signature, i + 4)
    path.write_bytes(bytes(raw))


def test_ckpt_members_declaring_more_than_the_file_are_refused(tmp_path):
    path = tmp_path / "forged.ckpt"
    torch.save({"state_dict": {"w": torch.ones(4)}}, path)
    member = next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("data/0"))
    forge_member_size(path, member, 3_500_000_000)
    peak, raised = peak_bytes(read_checkpoint, path)
    assert isinstance(raised, CheckpointError), repr(raised)
    assert f"zip member {member!r} declares 3500000000 bytes" in str(raised)
    assert peak < SLACK
    with pytest.raises(OSError, match="declares 3500000000 bytes"):  # a diffusers folder's .bin
        load_state_dict([path.rename(tmp_path / "diffusion_pytorch_model.bin")])
