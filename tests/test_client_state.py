"""Client state on disk: exact round trips, and a resume sees the checkpoint's states."""

from __future__ import annotations

import os

import pytest
import torch

from fedpose.fl.client_state import ClientStateStore


def _state(value: float) -> dict:
    return {
        "dyn_grad": {"w": torch.full((3, 2), value), "b": torch.arange(4.0) * value},
        "local": {
            "bn.running_mean": torch.tensor([value]),
            "bn.num_batches_tracked": torch.tensor(7),
        },
    }


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k]) for k in a
    )


@pytest.mark.parametrize("on_disk", [False, True])
def test_states_round_trip_exactly(tmp_path, on_disk):
    store = ClientStateStore(tmp_path / "s" if on_disk else None)
    assert store.get(3) == {}
    store.put(3, _state(0.1))
    store.put(5, _state(-2.5))
    assert _equal(store.get(3), _state(0.1))
    assert _equal(store.get(5), _state(-2.5))
    assert len(store) == 2
    if on_disk:
        assert store.bytes_in_memory() == 0
        assert store.bytes_on_disk() > 0


def test_stateless_clients_write_nothing(tmp_path):
    store = ClientStateStore(tmp_path)
    store.put(1, {})
    assert len(store) == 0 and not list(tmp_path.glob("*.safetensors"))


def test_resume_sees_the_states_of_the_checkpoint(tmp_path):
    store = ClientStateStore(tmp_path)
    store.put(0, _state(1.0))
    store.put(1, _state(2.0))
    checkpoint = store.state_dict()  # as saved at the end of a round
    store.put(0, _state(10.0))  # the next round trains client 0 again, then the run dies
    store.put(2, _state(30.0))
    store.flush()  # the worst case: the lost round's files reached the disk

    resumed = ClientStateStore(tmp_path)
    resumed.load_state_dict(checkpoint)
    assert _equal(resumed.get(0), _state(1.0))
    assert _equal(resumed.get(1), _state(2.0))
    assert resumed.get(2) == {}
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # the lost round's files are gone


def test_old_generations_are_deleted_once_no_checkpoint_needs_them(tmp_path):
    store = ClientStateStore(tmp_path)
    for r in range(5):
        store.put(0, _state(float(r)))
        store.state_dict()
    # the live state and the previous checkpoint's (still on disk until the next one replaces it)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    for r in range(3):  # between checkpoints nothing piles up either
        store.put(0, _state(float(r)))
    store.flush()  # the writes run in the background: count once they reached the disk
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_checkpoint_with_states_in_memory_loads_into_a_disk_store(tmp_path):
    memory = ClientStateStore()
    memory.put(4, _state(0.5))
    disk = ClientStateStore(tmp_path)
    disk.load_state_dict(memory.state_dict())
    assert _equal(disk.get(4), _state(0.5))


def test_states_are_written_in_the_background_and_read_back_at_once(tmp_path):
    store = ClientStateStore(tmp_path)
    for generation in range(3):  # more writes than may be in flight, the same clients again
        for client in range(6):
            store.put(client, _state(10.0 * generation + client))
            assert _equal(store.get(client), _state(10.0 * generation + client))
    index = store.state_dict()["client_state_index"]
    assert index == dict.fromkeys(range(6), 2)
    assert all((tmp_path / f"{c}.2.safetensors").stat().st_size > 0 for c in range(6))


def test_a_failed_state_write_is_an_error_not_a_lost_state(tmp_path):
    store = ClientStateStore(tmp_path / "s")
    store.put(0, _state(1.0))
    store.flush()
    (tmp_path / "s").rename(tmp_path / "gone")  # the folder vanishes under the run
    store.put(1, _state(2.0))
    with pytest.raises(OSError, match="client state not written"):
        store.state_dict()


def test_a_link_planted_at_a_state_file_is_replaced_not_written_through(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    store = ClientStateStore(tmp_path / "s")
    store.put(0, _state(1.0))
    store.flush()
    (tmp_path / "s" / "0.1.safetensors").symlink_to(outside)  # where the next write goes
    store.put(0, _state(2.0))
    store.flush()
    assert outside.read_text() == "keep me"
    assert not (tmp_path / "s" / "0.1.safetensors").is_symlink()
    assert _equal(store.get(0), _state(2.0))
    # readable as the run folder's other files are (safetensors' temporary starts as 0o600)
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "s" / "0.1.safetensors").stat().st_mode & 0o777 == 0o644 & ~umask


def test_a_resume_removes_the_temporary_of_an_interrupted_write(tmp_path):
    store = ClientStateStore(tmp_path)
    store.put(0, _state(1.0))
    checkpoint = store.state_dict()
    (tmp_path / ".tmpAb3dE9").write_bytes(b"half a file")  # killed inside save_file
    (tmp_path / "notes.txt").write_text("not the store's")
    resumed = ClientStateStore(tmp_path)
    resumed.load_state_dict(checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.0.safetensors", "notes.txt"]
    assert _equal(resumed.get(0), _state(1.0))
