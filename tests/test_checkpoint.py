"""Checkpoints: round trip, pruning, and falling back past every kind of damaged checkpoint."""
from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dcluster.runtime.checkpoint import (
    SHARD_FILES,
    CheckpointError,
    capture_rng_state,
    checkpoint_name,
    load_checkpoint,
    load_latest,
    load_shard,
    restore_rng_state,
    save_checkpoint,
    save_shard,
    shard_path,
)


@pytest.fixture
def warnings_seen(caplog: pytest.LogCaptureFixture):
    """Capture dcluster.runtime.checkpoint warnings even where the dcluster logger does not propagate
    (dcluster.core.logs.configure_logging turns propagation off)."""
    logger = logging.getLogger("dcluster.runtime.checkpoint")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)


def _state(value: int) -> dict:
    return {"value": value, "weights": torch.full((4, 3), float(value)),
            "labels": np.arange(10) * value}


def _ckpt_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_round_trip_keeps_tensors_arrays_and_rng_streams(tmp_path: Path) -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    state = {"model": {"w": torch.randn(5, 5)}, "labels": np.random.randint(0, 7, 100),
             "rng": capture_rng_state(), "epoch": 3}
    expected = (random.random(), np.random.rand(3), torch.rand(3))
    save_checkpoint(tmp_path, state, epoch=3)

    random.random(), np.random.rand(10), torch.rand(10)  # move every stream on
    loaded, path = load_latest(tmp_path)
    restore_rng_state(loaded["rng"])
    assert path.name == "ckpt_e000003_i0000000.pt"
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    np.testing.assert_array_equal(loaded["labels"], state["labels"])
    assert random.random() == expected[0]
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert torch.equal(torch.rand(3), expected[2])


def test_keeps_the_newest_complete_checkpoints_sorted_by_numbers(tmp_path: Path) -> None:
    for epoch, iteration in [(9, 0), (10, 0), (10, 5), (11, 0), (100, 0)]:
        save_checkpoint(tmp_path, _state(epoch), epoch, iteration, keep_last=3)
    assert _ckpt_files(tmp_path) == [
        "ckpt_e000010_i0000005.pt", "ckpt_e000010_i0000005.pt.sha256",
        "ckpt_e000011_i0000000.pt", "ckpt_e000011_i0000000.pt.sha256",
        "ckpt_e000100_i0000000.pt", "ckpt_e000100_i0000000.pt.sha256"]
    assert load_latest(tmp_path)[0]["value"] == 100


def test_truncated_newest_falls_back_with_a_warning(tmp_path: Path, warnings_seen) -> None:
    save_checkpoint(tmp_path, _state(1), epoch=1)
    newest = save_checkpoint(tmp_path, _state(2), epoch=2)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    state, path = load_latest(tmp_path)
    assert state["value"] == 1 and path.name == "ckpt_e000001_i0000000.pt"
    assert newest.name in warnings_seen.text and "corrupt" in warnings_seen.text


def test_flipped_byte_is_caught_by_the_checksum(tmp_path: Path, warnings_seen) -> None:
    save_checkpoint(tmp_path, _state(1), epoch=1)
    newest = save_checkpoint(tmp_path, _state(2), epoch=2)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))

    assert load_latest(tmp_path)[0]["value"] == 1
    assert "sha256" in warnings_seen.text and newest.name in warnings_seen.text


def test_data_file_without_sidecar_is_incomplete(tmp_path: Path, warnings_seen) -> None:
    save_checkpoint(tmp_path, _state(1), epoch=1)
    torch.save(_state(2), tmp_path / "ckpt_e000002_i0000000.pt")  # killed before the sidecar

    assert load_latest(tmp_path)[0]["value"] == 1
    assert "ckpt_e000002_i0000000.pt" in warnings_seen.text and "incomplete" in warnings_seen.text


def test_matching_checksum_but_unloadable_falls_back(tmp_path: Path, warnings_seen) -> None:
    save_checkpoint(tmp_path, _state(1), epoch=1)
    bad = tmp_path / "ckpt_e000002_i0000000.pt"
    bad.write_bytes(b"not a torch archive")
    (tmp_path / (bad.name + ".sha256")).write_text(
        hashlib.sha256(bad.read_bytes()).hexdigest() + "  " + bad.name + "\n")

    assert load_latest(tmp_path)[0]["value"] == 1
    assert "torch.load" in warnings_seen.text


def test_explicit_corrupt_path_raises_naming_the_file(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _state(1), epoch=1)
    assert load_checkpoint(path)["value"] == 1
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=path.name):
        load_checkpoint(path)


def test_writer_killed_mid_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _state(1), epoch=1)

    class Killed(BaseException):
        pass

    class Exploding:
        """Pickling it raises after torch.save has started writing the archive."""

        def __reduce__(self):
            raise Killed

    with pytest.raises(Killed):
        save_checkpoint(tmp_path, {"big": torch.zeros(10_000), "bomb": Exploding()}, epoch=2)
    assert load_latest(tmp_path)[0]["value"] == 1
    assert not (tmp_path / "ckpt_e000002_i0000000.pt").exists()

    # A SIGKILL runs no cleanup: leave a partial temp file behind, as it would.
    stale = tmp_path / ".ckpt_e000002_i0000000.pt.abc123.tmp"
    stale.write_bytes(b"PK\x03\x04 partial")
    assert load_latest(tmp_path)[0]["value"] == 1
    save_checkpoint(tmp_path, _state(2), epoch=2)
    assert not stale.exists()
    assert load_latest(tmp_path)[0]["value"] == 2


def test_empty_or_missing_directory_gives_none(tmp_path: Path) -> None:
    assert load_latest(tmp_path) is None
    assert load_latest(tmp_path / "absent") is None


def test_resaving_an_older_point_sets_newer_ones_aside(tmp_path: Path) -> None:
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, _state(epoch), epoch)
    save_checkpoint(tmp_path, _state(20), epoch=2, iteration=0)  # resumed from epoch 1 again

    assert load_latest(tmp_path)[0]["value"] == 20
    assert (tmp_path / "ckpt_e000003_i0000000.pt.superseded").exists()


def _save_sharded(directory: Path, epoch: int, keep_last: int = 2, ranks: int = 2) -> list[Path]:
    """A checkpoint with one shard file per rank, written as the ranks do: shards first."""
    path = directory / checkpoint_name(epoch, 0)
    shards = [shard_path(path, "bank", r) for r in range(ranks)]
    described = [save_shard(shard, {"rows": torch.full((3, 2), float(epoch + r))})
                 for r, shard in enumerate(shards)]
    save_checkpoint(directory, {**_state(epoch), SHARD_FILES: described}, epoch=epoch,
                    keep_last=keep_last)
    return shards


def test_shard_files_are_pruned_with_their_checkpoint(tmp_path: Path) -> None:
    for epoch in (1, 2, 3):
        shards = _save_sharded(tmp_path, epoch)
    # a shard whose checkpoint was never committed (killed in between) goes at the next save
    orphan = shard_path(tmp_path / checkpoint_name(9, 0), "bank", 0)
    save_shard(orphan, {"rows": None})
    _save_sharded(tmp_path, 4)
    names = _ckpt_files(tmp_path)
    assert not any(name.startswith((checkpoint_name(1, 0), checkpoint_name(2, 0),
                                     checkpoint_name(9, 0))) for name in names)
    assert {p.name for p in shards} <= set(names)
    payload, path = load_latest(tmp_path, with_shards=True)
    assert path.name == checkpoint_name(4, 0)
    assert torch.equal(load_shard(tmp_path, payload[SHARD_FILES][1])["rows"],
                       torch.full((3, 2), 5.0))


def test_a_checkpoint_with_a_missing_or_truncated_shard_is_skipped_on_resume(
        tmp_path: Path, warnings_seen) -> None:
    _save_sharded(tmp_path, 1, keep_last=3)
    missing = _save_sharded(tmp_path, 2, keep_last=3)[1]
    missing.unlink()
    assert load_latest(tmp_path, with_shards=True)[1].name == checkpoint_name(1, 0)
    assert f"checkpoint shard {missing}: no such file" in warnings_seen.text
    # an evaluation reads the model alone: the shards do not matter to it
    assert load_latest(tmp_path)[1].name == checkpoint_name(2, 0)
    truncated = _save_sharded(tmp_path, 3, keep_last=3)[0]
    truncated.write_bytes(truncated.read_bytes()[:-7])
    assert load_latest(tmp_path, with_shards=True)[1].name == checkpoint_name(1, 0)
    assert "(truncated?)" in warnings_seen.text


def test_a_shard_with_a_flipped_byte_is_refused_by_its_reader(tmp_path: Path) -> None:
    shard = _save_sharded(tmp_path, 1)[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    payload, _ = load_latest(tmp_path, with_shards=True)  # the same size: found on reading
    with pytest.raises(CheckpointError, match=f"checkpoint shard {shard}: corrupt"):
        load_shard(tmp_path, payload[SHARD_FILES][0])
