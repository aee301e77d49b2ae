"""The shared-memory hand-over of weights (weights/shm_file.py), both sides in this process."""

import json

import pytest
import torch
from safetensors.torch import load_file

from parityrl.weights.digest import tensor_digest
from parityrl.weights.shm_file import MappedUpdateFile, SharedUpdateFile


def _state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    embed = torch.randn(10, 4, generator=gen)
    return {"model.embed_tokens.weight": embed, "model.norm.weight": torch.randn(4, generator=gen),
            "layer.w": torch.randn(3, 5, generator=gen), "lm_head.weight": embed}


def test_worker_sees_exactly_what_the_trainer_wrote(tmp_path):
    sender, receiver = SharedUpdateFile(tmp_path), MappedUpdateFile()
    state = _state(0)
    path, sent = sender.write(state, "float32")
    received = dict(receiver.tensors(str(path)))
    # Tied lm_head is sent once, under the embedding's name (as HF checkpoints store it).
    assert set(received) == {"model.embed_tokens.weight", "model.norm.weight", "layer.w"}
    for name, tensor in received.items():
        assert torch.equal(tensor, state[name])
        assert tensor_digest(tensor) == sent[name]
    # The file is plain safetensors: any tool can open it.
    assert torch.equal(load_file(path)["layer.w"], state["layer.w"])


def test_the_file_is_reused_and_the_worker_mapping_sees_the_next_update(tmp_path):
    sender, receiver = SharedUpdateFile(tmp_path), MappedUpdateFile()
    path1, _ = sender.write(_state(0), "float32")
    list(receiver.tensors(str(path1)))
    path2, sent2 = sender.write(_state(1), "float32")
    assert path2 == path1 and len(list(tmp_path.iterdir())) == 1
    received = dict(receiver.tensors(str(path2)))
    assert torch.equal(received["layer.w"], _state(1)["layer.w"])
    assert {n: tensor_digest(t) for n, t in received.items()} == sent2


def test_a_new_layout_gets_a_new_file_and_the_old_one_is_removed(tmp_path):
    sender, receiver = SharedUpdateFile(tmp_path), MappedUpdateFile()
    path1, _ = sender.write(_state(0), "float32")
    path2, _ = sender.write(_state(0), "float32", skip={"layer.w"})
    assert path2 != path1 and not path1.exists()
    assert "layer.w" not in dict(receiver.tensors(str(path2)))
    sender.close()
    assert list(tmp_path.iterdir()) == []


def test_tensors_are_cast_to_the_engine_dtype(tmp_path):
    path, sent = SharedUpdateFile(tmp_path).write(_state(0), "bfloat16")
    received = dict(MappedUpdateFile().tensors(str(path)))
    assert received["layer.w"].dtype == torch.bfloat16
    assert torch.equal(received["layer.w"], _state(0)["layer.w"].to(torch.bfloat16))
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert json.loads(path.read_bytes()[8:8 + header_len])["layer.w"]["dtype"] == "BF16"


def test_aliasing_detects_a_tensor_that_kept_a_view_of_the_file(tmp_path):
    path, _ = SharedUpdateFile(tmp_path).write(_state(0), "float32")
    receiver = MappedUpdateFile()
    views = dict(receiver.tensors(str(path)))
    copies = [t.clone() for t in views.values()]
    assert receiver.aliased(copies) == []
    assert len(receiver.aliased([views["layer.w"]])) == 1


@pytest.mark.parametrize("change", ["value", "dtype", "shape"])
def test_digest_changes_with_any_bit_dtype_or_shape(change):
    t = torch.arange(6, dtype=torch.float32)
    other = {"value": t.clone().index_fill_(0, torch.tensor([3]), 3.0000002),
             "dtype": t.to(torch.float64), "shape": t.view(2, 3)}[change]
    assert tensor_digest(other) != tensor_digest(t)
    assert tensor_digest(t.clone()) == tensor_digest(t)


def test_a_tied_lm_head_is_sent_once_under_the_embeddings_name_in_either_order():
    import torch

    from parityrl.weights.shm_file import unique_tensors

    embed, norm = torch.ones(4, 2), torch.zeros(2)
    for state in ({"model.embed_tokens.weight": embed, "model.norm.weight": norm,
                   "lm_head.weight": embed},
                  {"lm_head.weight": embed, "model.embed_tokens.weight": embed,
                   "model.norm.weight": norm}):  # sorted by name, as transformers' save sorts
        assert set(unique_tensors(state)) == {"model.embed_tokens.weight", "model.norm.weight"}
    assert set(unique_tensors({"lm_head.weight": torch.ones(4, 2), "model.x": embed})) == {
        "lm_head.weight", "model.x"}  # untied: both
