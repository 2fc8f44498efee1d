"""Transport precision: the wire casts round-trip like torch's own casts, replies in
the wrong precision are rejected, and 16 bits halve the bytes of the real messages."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from common.config import RunConfig
from common.model import adapter_state, get_model
from common.transport import WIRE_DTYPES, decode_state, encode_state, from_wire, to_wire
from server.strategies import build_strategy, message_bytes
from tests.test_strategies import FakeGrid

# Normal, subnormal, huge (inf in float16), rounding ties and signed zeros.
VALUES = torch.cat([torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3,
                    torch.tensor([1e-6, -3e-8, 7e4, -1e5, 1 + 2**-9, 1 + 3 * 2**-9, 0.0, -0.0])])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_round_trip_equals_torch_cast(dtype):
    wire = to_wire(VALUES, dtype)
    assert wire.dtype == np.dtype(WIRE_DTYPES[dtype]) and wire.nbytes == 2 * VALUES.numel()
    back = from_wire(wire, dtype)
    expected = VALUES.to(getattr(torch, dtype)).to(torch.float32)
    assert back.dtype == torch.float32
    assert torch.equal(back, expected)  # bit for bit, inf included
    assert torch.equal(torch.signbit(back), torch.signbit(expected))


def test_float32_round_trip_is_exact_and_through_an_array_record():
    state = {"a": VALUES.reshape(8, -1)[:, :10].contiguous(), "b": VALUES[:7]}
    for dtype in ("float32", "float16", "bfloat16"):
        record = ArrayRecord({k: Array(v) for k, v in encode_state(state, dtype).items()})
        back = decode_state({k: a.numpy() for k, a in record.items()}, dtype)
        for name, tensor in state.items():
            expected = tensor.to(getattr(torch, dtype)).float()
            assert torch.equal(back[name], expected) and back[name].shape == tensor.shape


def test_wire_array_in_another_precision_is_refused():
    with pytest.raises(ValueError, match="travels as uint16"):
        from_wire(np.zeros(3, dtype=np.float16), "bfloat16")
    with pytest.raises(ValueError, match="transport dtype must be one of"):
        to_wire(torch.zeros(3), "float8")


def _reply(to: Message, arrays: dict, num_examples=10) -> Message:
    metrics = MetricRecord({"train-loss": 1.0, "num-examples": num_examples})
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Message(content=RecordDict({"arrays": record, "metrics": metrics}), reply_to=to)


@pytest.mark.parametrize("transport, wrong", [
    ("float16", "float32"), ("float16", "bfloat16"), ("bfloat16", "float16"),
    ("float32", "float16"),
])
def test_reply_in_the_wrong_transport_dtype_is_rejected(flower_identity, caplog, transport,
                                                         wrong):
    cfg = RunConfig(num_clients=3, min_train_clients=2, transport_dtype=transport)
    strategy = build_strategy(cfg)
    initial = ArrayRecord({"w": torch.zeros(4, 3)})
    sent = list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid([1, 2, 3])))
    assert all(m.content["config"]["transport-dtype"] == transport for m in sent)
    assert sent[0].content["arrays"]["w"].dtype == WIRE_DTYPES[transport]
    values = [torch.full((4, 3), v) for v in (1.0, 3.0, 2.0)]
    replies = [_reply(sent[0], encode_state({"w": values[0]}, transport)),
               _reply(sent[1], encode_state({"w": values[1]}, transport)),
               _reply(sent[2], encode_state({"w": values[2]}, wrong))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.traffic.rejected["dtype"] == 1 and strategy.traffic.replies == 2
    assert f"('transport-dtype' {transport})" in caplog.text
    # aggregated in float32 from the two valid replies
    assert arrays["w"].dtype == "float32"
    np.testing.assert_array_equal(arrays["w"].numpy(), np.full((4, 3), 2.0, dtype=np.float32))


def test_payload_whose_data_disagrees_with_its_declared_dtype_is_rejected(flower_identity):
    strategy = build_strategy(RunConfig(num_clients=3, min_train_clients=2,
                                        transport_dtype="bfloat16"))
    sent = list(strategy.configure_train(1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord(),
                                         FakeGrid([1, 2, 3])))
    good = [_reply(m, encode_state({"w": torch.ones(2)}, "bfloat16")) for m in sent[:2]]
    forged = Array(dtype="uint16", shape=(2,), stype="numpy.ndarray",
                   data=Array(np.ones(2, dtype=np.float16)).data)  # float16 bits, uint16 label
    bad = Message(RecordDict({"arrays": ArrayRecord({"w": forged}),
                              "metrics": MetricRecord({"train-loss": 1.0, "num-examples": 10})}),
                  reply_to=sent[2])
    strategy.aggregate_train(1, good + [bad])
    assert strategy.traffic.rejected["dtype"] == 1


def _client_round(cfg: RunConfig, start: dict) -> tuple:
    """One round from adapter ``start`` with the real ClientApp train() on two partitions."""
    from client.app import train

    strategy = build_strategy(cfg)
    initial = ArrayRecord({k: v.clone() for k, v in start.items()})
    sent = list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid([1, 2])))
    replies = []
    for partition, msg in enumerate(sent):
        context = Context(run_id=1, node_id=partition + 1, state=RecordDict(),
                          node_config={"partition-id": partition, "num-partitions": 2},
                          run_config=cfg.to_mapping())
        replies.append(train(msg, context))
    wire = {r.content["arrays"][name].dtype for r in replies for name in r.content["arrays"]}
    reply_bytes = [message_bytes(r) for r in replies]
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy.traffic, wire, reply_bytes, arrays


def test_16_bit_transport_halves_the_tensor_bytes_of_real_messages(tiny_cfg, flower_identity):
    cfg = tiny_cfg.replace(lora_r=16)
    start = adapter_state(get_model(cfg))  # the clients share (and train) this cached model
    start = {k: v + 0.01 * torch.randn_like(v) for k, v in start.items()}  # B no longer 0
    numel = sum(t.numel() for t in start.values())
    runs = {dtype: _client_round(cfg.replace(transport_dtype=dtype), start)
            for dtype in ("float32", "float16", "bfloat16")}
    for dtype, (traffic, wire, reply_bytes, arrays) in runs.items():
        assert wire == {WIRE_DTYPES[dtype]}  # the client replied in the transport dtype
        assert traffic.replies == 2 and traffic.bytes_received == sum(reply_bytes)
        assert {a.dtype for a in arrays.values()} == {"float32"}  # aggregated in float32
    full, half = runs["float32"][0], runs["float16"][0]
    # Two bytes fewer per adapter value in each message; the framing is the same.
    assert full.bytes_received - half.bytes_received == pytest.approx(2 * 2 * numel, rel=0.01)
    assert full.bytes_sent - half.bytes_sent == pytest.approx(2 * 2 * numel, rel=0.01)
    assert half.bytes_received < 0.6 * full.bytes_received
    assert runs["bfloat16"][0].bytes_received == pytest.approx(half.bytes_received, rel=0.01)
    # 16-bit transport changes the average by no more than the rounding of its inputs
    a32, a16 = runs["float32"][3], runs["float16"][3]
    for name in a32:
        np.testing.assert_allclose(a16[name].numpy(), a32[name].numpy(), atol=2e-3)
