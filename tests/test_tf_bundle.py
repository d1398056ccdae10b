"""The TensorFlow tensor-bundle reader against checkpoints written by real TensorFlow.

Fixtures: ../shared/fixtures/openai-gpt2-tiny (OpenAI's layout, 2 layers) and
tests/fixtures/tf/* (made by tests/fixtures/tf/make_fixtures.py with tensorflow-cpu 2.21).
Damaged copies are made here at run time by flipping or cutting bytes of those files.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from gpt2_scratch.convert.errors import BundleError
from gpt2_scratch.convert.tf_bundle import (
    TensorBundle,
    checkpoint_prefix,
    crc32c,
    data_block_handles,
    mask_crc,
    read_index,
    unmask_crc,
)

HERE = Path(__file__).resolve().parent
SHARED_TINY = HERE.parent.parent / "shared" / "fixtures" / "openai-gpt2-tiny"
TF = HERE / "fixtures" / "tf"


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """Copy a checkpoint folder (only the checkpoint files) to dst; return dst."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name.startswith("model.ckpt") or f.name in ("checkpoint", "hparams.json"):
            shutil.copy(f, dst / f.name)
    return dst


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# --- crc32c ---------------------------------------------------------------------------------
def test_crc32c_known_vector_and_mask_roundtrip():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283  # continuing a crc over chunks
    for value in (0, 1, 0xE3069283, 0xFFFFFFFF):
        assert unmask_crc(mask_crc(value)) == value


# --- reading real TensorFlow checkpoints ------------------------------------------------------
def test_shared_fixture_every_tensor_equals_expected():
    expected = np.load(SHARED_TINY / "expected.npz")
    with TensorBundle(checkpoint_prefix(SHARED_TINY)) as bundle:
        assert sorted(n.replace("/", "__") for n in bundle.names()) == sorted(expected.files)
        for name in bundle.names():
            got = bundle.read(name)
            want = expected[name.replace("/", "__")]
            assert got.dtype == np.float32 and got.shape == want.shape, name
            assert np.array_equal(got, want), name  # bit-exact


def test_148_tensor_checkpoint_like_the_124M_release():
    folder = TF / "gpt2-12layer"
    expected = np.load(folder / "expected.npz")  # as TensorFlow's own reader returned them
    bundle = TensorBundle(checkpoint_prefix(folder))
    assert len(bundle) == 148 == len(expected.files)
    assert bundle.shape("model/h11/mlp/c_proj/w") == (1, 32, 8)
    for name in bundle.names():
        assert np.array_equal(bundle.read(name), expected[name.replace("/", "__")]), name


def test_index_with_several_data_blocks():
    folder = TF / "many-blocks"
    handles = data_block_handles(folder / "model.ckpt.index")
    assert len(handles) == 3  # TF cuts index blocks at 256 KB; this index is ~540 KB
    bundle = TensorBundle(folder / "model.ckpt")
    names = bundle.names()
    assert len(names) == 2400
    pad = "p" * 200
    for i, name in enumerate(names):  # sorted, contiguous across block boundaries
        assert name == f"blk/{i:04d}/{pad}"
        assert bundle.read(name).tolist() == [i, -i]


def test_arrays_are_memory_mapped_and_copy_on_write(tmp_path):
    folder = copy_checkpoint(TF / "gpt2-12layer", tmp_path / "ck")
    bundle = TensorBundle(folder / "model.ckpt")
    wte = bundle.read("model/wte")
    assert isinstance(wte.base, np.memmap) or isinstance(wte, np.memmap)
    before = (folder / "model.ckpt.data-00000-of-00001").read_bytes()
    wte[0, 0] = 123.0  # writable (torch.from_numpy needs it) but never written back
    del wte, bundle
    assert (folder / "model.ckpt.data-00000-of-00001").read_bytes() == before


# --- damaged files --------------------------------------------------------------------------
def test_flipped_data_byte_names_the_tensor(tmp_path):
    folder = copy_checkpoint(TF / "gpt2-12layer", tmp_path / "ck")
    entry = read_index(folder / "model.ckpt.index")[1]["model/h3/mlp/c_fc/w"]
    flip_byte(folder / "model.ckpt.data-00000-of-00001", entry.offset + 17)
    bundle = TensorBundle(folder / "model.ckpt")
    with pytest.raises(BundleError) as e:
        bundle.read("model/h3/mlp/c_fc/w")
    assert "tensor 'model/h3/mlp/c_fc/w'" in one_line(e) and "crc32c mismatch" in str(e.value)
    bundle.read("model/h3/mlp/c_fc/b")  # its neighbours are fine


@pytest.mark.parametrize("block", [0, 1, 2])
def test_flipped_index_byte_names_the_block(tmp_path, block):
    folder = copy_checkpoint(TF / "many-blocks", tmp_path / "ck")
    _, offset, size = data_block_handles(folder / "model.ckpt.index")[block]
    flip_byte(folder / "model.ckpt.index", offset + size // 2)
    with pytest.raises(BundleError) as e:
        TensorBundle(folder / "model.ckpt")
    assert f"crc32c mismatch in data block {block} at offset {offset}" in one_line(e)


def test_flipped_byte_in_index_block_and_footer_magic(tmp_path):
    folder = copy_checkpoint(TF / "gpt2-12layer", tmp_path / "ck")
    index = folder / "model.ckpt.index"
    data = index.read_bytes()
    _, offset, size = data_block_handles(index)[0]
    # the index block is the last block before the 48-byte footer
    flip_byte(index, len(data) - 48 - 5 - 3)
    with pytest.raises(BundleError) as e:
        read_index(index)
    assert "crc32c mismatch in index block" in one_line(e)

    index.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(BundleError) as e:
        read_index(index)
    assert "bad table magic" in one_line(e) and str(index) in str(e.value)


@pytest.mark.parametrize("keep", [0, 20, 47, 1000, -1])
def test_truncated_index(tmp_path, keep):
    folder = copy_checkpoint(TF / "gpt2-12layer", tmp_path / "ck")
    index = folder / "model.ckpt.index"
    data = index.read_bytes()
    index.write_bytes(data[:keep])
    with pytest.raises(BundleError) as e:
        TensorBundle(folder / "model.ckpt")
    msg = one_line(e)
    assert str(index) in msg
    assert ("truncated" in msg) or ("bad table magic" in msg)


def test_index_cut_in_the_middle_keeping_the_footer(tmp_path):
    folder = copy_checkpoint(TF / "gpt2-12layer", tmp_path / "ck")
    index = folder / "model.ckpt.index"
    data = index.read_bytes()
    index.write_bytes(data[:1000] + data[-48:])  # footer intact, handles now point past the end
    with pytest.raises(BundleError) as e:
        TensorBundle(folder / "model.ckpt")
    assert "runs past the end of the file" in one_line(e) and "index block" in str(e.value)


def test_snappy_block_is_refused(tmp_path):
    folder = copy_checkpoint(TF / "gpt2-12layer", tmp_path / "ck")
    index = folder / "model.ckpt.index"
    data = bytearray(index.read_bytes())
    _, offset, size = data_block_handles(index)[0]
    data[offset + size] = 1  # compression type: snappy, with a crc that is right for it
    data[offset + size + 1:offset + size + 5] = struct.pack("<I", mask_crc(crc32c(bytes(data[offset:offset + size + 1]))))
    index.write_bytes(bytes(data))
    with pytest.raises(BundleError) as e:
        TensorBundle(folder / "model.ckpt")
    assert "data block 0" in one_line(e) and "snappy" in str(e.value)


def test_truncated_data_file_names_the_tensor(tmp_path):
    folder = copy_checkpoint(TF / "gpt2-12layer", tmp_path / "ck")
    shard = folder / "model.ckpt.data-00000-of-00001"
    shard.write_bytes(shard.read_bytes()[:-100])
    bundle = TensorBundle(folder / "model.ckpt")
    last = max(bundle.entries.values(), key=lambda e: e.offset)
    with pytest.raises(BundleError) as e:
        bundle.read(last.name)
    assert f"tensor '{last.name}'" in one_line(e) and "runs past the end" in str(e.value)


def test_missing_data_file(tmp_path):
    folder = copy_checkpoint(TF / "gpt2-12layer", tmp_path / "ck")
    (folder / "model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(BundleError) as e:
        TensorBundle(folder / "model.ckpt")
    assert "model.ckpt.data-00000-of-00001: data shard missing" in one_line(e)


# --- unsupported features are refused, never misread ----------------------------------------
def test_other_dtypes_are_refused_by_name():
    bundle = TensorBundle(TF / "odd-dtypes" / "model.ckpt")
    assert bundle.read("model/wte").tolist() == [[1.0, 1.0]] * 4
    with pytest.raises(BundleError) as e:
        bundle.read("global_step")
    assert "tensor 'global_step' has dtype int64" in one_line(e)
    with pytest.raises(BundleError) as e:
        bundle.read("model/half")
    assert "tensor 'model/half' has dtype float16" in one_line(e)


def test_partitioned_variable_is_refused():
    bundle = TensorBundle(TF / "partitioned" / "model.ckpt")
    assert bundle.names() == ["model/wte"]  # the slice entries are not listed as tensors
    with pytest.raises(BundleError) as e:
        bundle.read("model/wte")
    assert "tensor 'model/wte' is a partitioned (sliced) variable" in one_line(e)


def test_several_shards_are_refused():
    with pytest.raises(BundleError) as e:
        TensorBundle(TF / "two-shards" / "model.ckpt")
    assert "2 data shards" in one_line(e)


def test_checkpoint_prefix_resolution(tmp_path):
    assert checkpoint_prefix(SHARED_TINY) == SHARED_TINY / "model.ckpt"
    # An absolute path written on another machine: fall back to the file beside it.
    folder = copy_checkpoint(TF / "gpt2-12layer", tmp_path / "ck")
    (folder / "checkpoint").write_text('model_checkpoint_path: "/somewhere/else/model.ckpt"\n')
    assert checkpoint_prefix(folder) == folder / "model.ckpt"
    (folder / "checkpoint").unlink()
    assert checkpoint_prefix(folder) == folder / "model.ckpt"
    with pytest.raises(BundleError) as e:
        checkpoint_prefix(tmp_path)
    assert "no TensorFlow checkpoint index" in one_line(e)


def test_pure_python_crc_fallback_reads_the_same(tmp_path):
    """Without google-crc32c the reader still verifies every crc (slowly), and agrees."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['google_crc32c'] = None\n"
        "import numpy as np\n"
        "from gpt2_scratch.convert.tf_bundle import TensorBundle, crc32c, _gcrc\n"
        "assert _gcrc is None and crc32c(b'123456789') == 0xE3069283\n"
        f"b = TensorBundle({str(SHARED_TINY / 'model.ckpt')!r})\n"
        f"e = np.load({str(SHARED_TINY / 'expected.npz')!r})\n"
        "assert all(np.array_equal(b.read(n), e[n.replace('/', '__')]) for n in b.names())\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=HERE.parent, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
