import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from common.config import RunConfig
from common.model import (
    adapter_num_bytes, adapter_state, get_model, resolve_model_path, set_adapter_state,
)


def test_model_is_cached_per_process(tiny_cfg):
    assert get_model(tiny_cfg) is get_model(tiny_cfg)


def test_adapter_round_trip_through_messages_is_bit_exact(tiny_cfg, flower_identity):
    """server -> client -> server through real Flower records: identical tensors."""
    model = get_model(tiny_cfg)
    torch.manual_seed(1)
    original = {k: torch.randn_like(v) for k, v in adapter_state(model).items()}
    sent = Message(content=RecordDict({"arrays": ArrayRecord(original)}),
                   dst_node_id=1, message_type="train")
    # client side: load what arrived, send it back unchanged
    set_adapter_state(model, sent.content["arrays"].to_torch_state_dict())
    reply = Message(content=RecordDict({"arrays": ArrayRecord(adapter_state(model)),
                                        "metrics": MetricRecord({"num-examples": 1})}),
                    reply_to=sent)
    back = reply.content["arrays"].to_torch_state_dict()
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_only_adapter_tensors_travel(tiny_cfg):
    model = get_model(tiny_cfg)
    record = ArrayRecord(adapter_state(model))
    assert all("lora_" in name for name in record)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tensor_bytes = adapter_num_bytes(model)
    # count_bytes = tensor data + numpy headers + key names; headers are < 200 B each
    overhead = record.count_bytes() - tensor_bytes
    assert 0 < overhead < 200 * len(record) + sum(len(k) for k in record)
    assert tensor_bytes < 0.1 * base_bytes
    assert tensor_bytes == sum(p.numel() * 4 for n, p in model.named_parameters()
                               if p.requires_grad)


def test_adapter_that_does_not_fit_is_refused(tiny_cfg):
    model = get_model(tiny_cfg)
    other = get_model(tiny_cfg.replace(lora_r=8))
    with pytest.raises(ValueError, match="was the LoRA rank the same"):
        set_adapter_state(model, adapter_state(other))
    state = adapter_state(model)
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="1 missing tensors"):
        set_adapter_state(model, state)


def test_missing_model_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="model path './no/such/model' does not exist"):
        resolve_model_path("./no/such/model")
