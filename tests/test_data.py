"""Tests for jaxdeep.data: tokenizer, sources, split, resumable iterator, placement on a mesh."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdeep.data import (
    EOS_MARKER,
    ByteTokenizer,
    TokenBatches,
    load_tokens,
    split_train_eval,
    stdlib_files,
    to_global_array,
    token_fingerprint,
)

STDLIB_CAP = 300_000  # bytes: enough for several files, fast on 2 cores


@pytest.fixture(scope="module")
def stdlib_tokens() -> np.ndarray:
    return load_tokens("stdlib", max_bytes=STDLIB_CAP)


def _stream(n: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16)


# Tokenizer


def test_tokenizer_round_trip_ascii_and_non_ascii():
    tok = ByteTokenizer()
    ids = tok.encode("def f(x):\n    return x")
    assert ids.dtype == np.int32
    assert ids.tolist() == list(b"def f(x):\n    return x")
    text = "héllo wörld — 日本語 🙂"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert tok.decode(ids) == text


def test_tokenizer_eos_and_invalid_bytes():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 and tok.eos_id == 0
    ids = np.concatenate([tok.encode("ab"), [tok.eos_id], tok.encode("c")])
    assert tok.decode(ids) == "abc"
    assert tok.decode(ids, show_eos=True) == f"ab{EOS_MARKER}c"
    assert tok.encode("x", prepend_eos=True).tolist() == [0, ord("x")]
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"
    with pytest.raises(ValueError, match="NUL"):
        tok.encode("a\x00b")
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        tok.decode([256])


# Sources


def test_stdlib_files_skip_site_packages_and_tests():
    paths = [rel for rel, _ in stdlib_files()]
    assert "os.py" in paths and "json/decoder.py" in paths
    parts = {part for rel in paths for part in rel.split("/")[:-1]}
    assert not parts & {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    assert all(rel.endswith(".py") for rel in paths)
    assert len(set(paths)) == len(paths)
    # The order is a spread, not alphabetical.
    assert paths != sorted(paths)


def test_stdlib_corpus_deterministic_with_python_text(stdlib_tokens):
    again = load_tokens("stdlib", max_bytes=STDLIB_CAP)
    assert stdlib_tokens.dtype == np.uint8 and stdlib_tokens.ndim == 1
    assert len(stdlib_tokens) == STDLIB_CAP
    np.testing.assert_array_equal(stdlib_tokens, again)
    data = stdlib_tokens.tobytes()
    assert b"def " in data and b"import " in data
    assert data.count(b"\x00") >= 3  # eos after each file
    # A smaller cap is a prefix of a larger one.
    np.testing.assert_array_equal(load_tokens("stdlib", max_bytes=50_000), stdlib_tokens[:50_000])
    # The first document is the first file in corpus order, followed by eos.
    first = stdlib_files()[0][1].read_bytes()
    assert data.startswith(first + b"\x00") or (len(first) >= STDLIB_CAP and data == first[:STDLIB_CAP])


def test_text_source(tmp_path):
    text = "première ligne\nzweite Zeile — 第三行\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    tokens = load_tokens(path)
    np.testing.assert_array_equal(tokens, ByteTokenizer().encode(text))
    assert ByteTokenizer().decode(tokens) == text
    np.testing.assert_array_equal(load_tokens(str(path), max_bytes=5), tokens[:5])


def test_npy_source_is_memory_mapped(tmp_path):
    ids = (np.arange(10_000) % 1000).astype(np.uint16)
    path = tmp_path / "ids.npy"
    np.save(path, ids)
    tokens = load_tokens(path, vocab_size=1000)
    assert isinstance(tokens, np.memmap)
    np.testing.assert_array_equal(tokens, ids)
    np.testing.assert_array_equal(load_tokens(path, max_bytes=100, vocab_size=1000), ids[:50])


@pytest.mark.parametrize(
    "array, vocab, message",
    [
        (np.zeros(10, np.float32), 256, "dtype float32"),
        (np.zeros((2, 5), np.int32), 256, r"shape \(2, 5\)"),
        (np.array([1, 2, 300], np.int32), 256, "token id 300 at position 2"),
        (np.array([1, -1], np.int32), 256, "token id -1 at position 1"),
        (np.zeros(0, np.int32), 256, "empty"),
    ],
)
def test_npy_bad_inputs(tmp_path, array, vocab, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ValueError, match=message) as error:
        load_tokens(path, vocab_size=vocab)
    assert "bad.npy" in str(error.value)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file.*'stdlib'"):
        load_tokens(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt' is empty"):
        load_tokens(empty)
    binary = tmp_path / "tokens.bin"
    binary.write_bytes(b"abc\x00def")
    with pytest.raises(ValueError, match="NUL byte at offset 3.*.npy suffix"):
        load_tokens(binary)
    with pytest.raises(ValueError, match="not a regular file"):
        load_tokens(tmp_path)
    with pytest.raises(ValueError, match="vocab_size=100.*at least 256"):
        load_tokens("stdlib", max_bytes=1000, vocab_size=100)
    with pytest.raises(ValueError, match="max_bytes must be a positive integer"):
        load_tokens("stdlib", max_bytes=0)
    notnpy = tmp_path / "junk.npy"
    notnpy.write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="junk.npy' is not a readable .npy"):
        load_tokens(notnpy)


# Split


def test_split_disjoint_and_cut_at_document_boundary():
    docs = [np.full(length, 7, np.uint8) for length in (500, 300, 120, 60, 20)]
    stream = np.concatenate([np.append(doc, 0) for doc in docs]).astype(np.uint8)
    train, held_out = split_train_eval(stream, eval_fraction=0.1)
    # Disjoint, covering, and views of the same memory.
    assert len(train) + len(held_out) == len(stream)
    np.testing.assert_array_equal(np.concatenate([train, held_out]), stream)
    assert np.shares_memory(train, stream) and not np.shares_memory(train, held_out)
    # 10% of 1005 is ~100: the nearest document boundary leaves the last two documents (82 tokens) out.
    assert train[-1] == 0 and len(held_out) == 82


def test_split_without_eos_cuts_exactly_and_validates():
    stream = np.arange(1, 1001, dtype=np.int32)
    train, held_out = split_train_eval(stream, eval_fraction=0.05)
    assert len(held_out) == 50 and train[-1] == 950 and held_out[0] == 951
    train, held_out = split_train_eval(stream, eval_fraction=0.0)
    assert len(train) == 1000 and len(held_out) == 0
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match="eval_fraction"):
            split_train_eval(stream, eval_fraction=bad)


@pytest.mark.parametrize("fraction", [0.02, 0.05, 0.2, 0.5])
def test_split_stdlib_cuts_at_a_nearby_document_boundary(stdlib_tokens, fraction):
    train, held_out = split_train_eval(stdlib_tokens, eval_fraction=fraction)
    n, target = len(stdlib_tokens), round(len(stdlib_tokens) * fraction)
    assert len(train) + len(held_out) == n and len(held_out) > 0
    assert abs(len(held_out) - target) <= target // 2 + 1
    # Whenever a file ends within half the eval size of the nominal cut, the cut is at a file end.
    nominal = n - target
    window = stdlib_tokens[max(0, nominal - 1 - target // 2) : nominal + target // 2]
    assert (train[-1] == 0) == bool((window == 0).any())


# Iterator


def test_batches_are_windows_of_the_stream():
    tokens = _stream(10_000)
    batches = TokenBatches(tokens, seq_len=16, batch_size=4, seed=3)
    for position in range(5):
        batch = next(batches)
        assert batch.shape == (4, 17) and batch.dtype == np.int32
        for row, start in zip(batch, batches.batch_starts(position), strict=True):
            np.testing.assert_array_equal(row, tokens[start : start + 17])


def test_batches_deterministic_given_seed():
    tokens = _stream(10_000)
    first = [next(b) for b in [TokenBatches(tokens, 16, 4, seed=5)] for _ in range(6)]
    second = [next(b) for b in [TokenBatches(tokens, 16, 4, seed=5)] for _ in range(6)]
    other = [next(b) for b in [TokenBatches(tokens, 16, 4, seed=6)] for _ in range(6)]
    np.testing.assert_array_equal(np.stack(first), np.stack(second))
    assert not np.array_equal(np.stack(first), np.stack(other))
    np.testing.assert_array_equal(TokenBatches(tokens, 16, 4, seed=5).batch_at(4), first[4])


def test_epoch_windows_distinct_and_wrap_around():
    tokens = _stream(1_000)
    batches = TokenBatches(tokens, seq_len=10, batch_size=8, seed=1)
    per_epoch = batches.batches_per_epoch
    assert batches.num_windows == 99 and per_epoch == 12
    for epoch in range(3):
        starts = np.concatenate([batches.batch_starts(epoch * per_epoch + k) for k in range(per_epoch)])
        assert len(set(starts.tolist())) == per_epoch * 8  # no window twice in an epoch
        assert len(set((starts % 10).tolist())) == 1  # one offset per epoch: windows never overlap
        assert starts.max() + 11 <= len(tokens)
    epoch0 = np.concatenate([batches.batch_starts(k) for k in range(per_epoch)])
    epoch1 = np.concatenate([batches.batch_starts(per_epoch + k) for k in range(per_epoch)])
    assert not np.array_equal(epoch0, epoch1)  # reshuffled each epoch
    # Iterating across the wrap gives the same batches as direct indexing, and the epoch counter moves.
    seen = [next(batches) for _ in range(per_epoch + 2)]
    np.testing.assert_array_equal(seen[per_epoch + 1], batches.batch_at(per_epoch + 1))
    assert batches.epoch == 1 and batches.state()["epoch"] == 1


def test_unshuffled_order_and_wrap():
    tokens = np.arange(1, 202, dtype=np.int32)  # 201 tokens, seq_len 10: 20 windows
    batches = TokenBatches(tokens, seq_len=10, batch_size=6, shuffle=False)
    assert batches.num_windows == 20 and batches.batches_per_epoch == 3
    np.testing.assert_array_equal(batches.batch_at(0)[:, 0], [1, 11, 21, 31, 41, 51])
    np.testing.assert_array_equal(batches.batch_at(0)[1], np.arange(11, 22))
    np.testing.assert_array_equal(batches.batch_at(3), batches.batch_at(0))


def test_resume_matches_uninterrupted_run():
    tokens = _stream(5_000)
    reference = TokenBatches(tokens, seq_len=12, batch_size=4, seed=11)
    per_epoch = reference.batches_per_epoch
    uninterrupted = [next(reference) for _ in range(per_epoch + 10)]
    for k in (0, 3, per_epoch - 1, per_epoch + 2):
        run = TokenBatches(tokens, seq_len=12, batch_size=4, seed=11)
        for _ in range(k):
            next(run)
        saved = json.loads(json.dumps(run.state()))
        resumed = TokenBatches(tokens.copy(), seq_len=12, batch_size=4, seed=11)
        resumed.restore(saved)
        assert resumed.position == k
        for expected in uninterrupted[k : k + 5]:
            np.testing.assert_array_equal(next(resumed), expected)


def test_restore_mismatch_raises():
    tokens = _stream(5_000)
    saved = TokenBatches(tokens, seq_len=12, batch_size=4, seed=11).state()
    changed = tokens.copy()
    changed[100] = (changed[100] + 1) % 256
    cases = [
        (TokenBatches(changed, 12, 4, seed=11), "tokens_fingerprint saved"),
        (TokenBatches(tokens[:-1], 12, 4, seed=11), "num_tokens saved 5000, now 4999"),
        (TokenBatches(tokens, 16, 4, seed=11), "seq_len saved 12, now 16"),
        (TokenBatches(tokens, 12, 8, seed=11), "batch_size saved 4, now 8"),
        (TokenBatches(tokens, 12, 4, seed=12), "seed saved 11, now 12"),
        (TokenBatches(tokens, 12, 4, seed=11, shuffle=False), "shuffle saved True, now False"),
    ]
    for batches, message in cases:
        with pytest.raises(ValueError, match=message):
            batches.restore(saved)
        assert batches.position == 0
    fresh = TokenBatches(tokens, 12, 4, seed=11)
    with pytest.raises(ValueError, match="lacks position"):
        fresh.restore({k: v for k, v in saved.items() if k != "position"})
    with pytest.raises(ValueError, match="format"):
        fresh.restore({})
    with pytest.raises(TypeError, match="must be a dict"):
        fresh.restore([1, 2])
    with pytest.raises(ValueError, match="position"):
        fresh.restore({**saved, "position": -1})


def test_fingerprint_ignores_storage_dtype_but_not_values():
    ids = _stream(1000)
    assert token_fingerprint(ids) == token_fingerprint(ids.astype(np.int32))
    assert token_fingerprint(ids) != token_fingerprint(ids[::-1].copy())
    assert token_fingerprint(ids) != token_fingerprint(ids[:-1])


def test_too_short_and_bad_arguments():
    with pytest.raises(ValueError, match=r"has 100 tokens, too few.*batch_size=4 x seq_len=32.*at least 160"):
        TokenBatches(_stream(100), seq_len=32, batch_size=4)
    with pytest.raises(ValueError, match="at least 129"):
        TokenBatches(_stream(100), seq_len=32, batch_size=4, shuffle=False)
    TokenBatches(_stream(129), seq_len=32, batch_size=4, shuffle=False)  # exactly enough
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1"):
        TokenBatches(_stream(100), seq_len=0, batch_size=1)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        TokenBatches(_stream(100), seq_len=4, batch_size=1, seed=-1)
    with pytest.raises(ValueError, match="1-D integer"):
        TokenBatches(np.zeros(100, np.float32), seq_len=4, batch_size=1)


# Sharding


def _mesh() -> Mesh:
    devices = jax.devices("cpu")
    assert len(devices) == 8, "tests/conftest.py should provide 8 simulated CPU devices"
    return Mesh(np.array(devices).reshape(4, 2), ("data", "tensor"))


def test_to_global_array_reproduces_batch_on_8_device_mesh():
    mesh = _mesh()
    batch = TokenBatches(_stream(20_000), seq_len=31, batch_size=8, seed=0).batch_at(3)
    sharding = NamedSharding(mesh, P("data", None))
    array = to_global_array(batch, sharding)
    assert array.shape == batch.shape and array.dtype == np.int32
    assert array.sharding == sharding
    np.testing.assert_array_equal(np.asarray(array), batch)
    shards = array.addressable_shards
    assert len(shards) == 8
    for shard in shards:
        assert shard.data.shape == (2, 32)  # batch split 4 ways over data, replicated over tensor
        np.testing.assert_array_equal(np.asarray(shard.data), batch[shard.index])


def test_to_global_array_checks_divisibility():
    mesh = _mesh()
    batch = np.zeros((6, 9), np.int32)
    with pytest.raises(ValueError, match=r"batch size 6 is not divisible by 4.*\('data',\).*data=4"):
        to_global_array(batch, NamedSharding(mesh, P("data", None)))
    with pytest.raises(ValueError, match=r"batch size 12 is not divisible by 8.*data=4, tensor=2"):
        to_global_array(np.zeros((12, 9), np.int32), NamedSharding(mesh, P(("data", "tensor"), None)))
    batch = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
    array = to_global_array(batch, NamedSharding(mesh, P(("data", "tensor"))))
    assert len({shard.index[0].start for shard in array.addressable_shards}) == 8  # 8 row blocks
    np.testing.assert_array_equal(np.asarray(array), batch)
