"""``LitesparkConfig.compile_layers``: each decoder layer compiled on its own (``LITESPARK_COMPILE_BACKEND=aot_eager``
here: no C++ toolchain needed, the same graphs as inductor up to codegen), the unpadding eager.

Checked on a tiny Llama under bf16 autocast (CPU), padded batches of three lengths unpadded (`LITESPARK_UNPAD_CPU`),
with and without gradient checkpointing: the loss and every gradient equal the eager Litespark model's bitwise, no
graph break, at most two graphs per layer code (dynamic shapes: one recompile, no more); `restore` uncompiles; the
trainers refuse it with torch_compile or FSDP/DeepSpeed."""

import copy

import pytest
import torch

import litespark_hf
from tiny_models import random_batch, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_match_eager_on_unpadded_batches(monkeypatch, checkpointing):
    import torch._dynamo

    monkeypatch.setenv("LITESPARK_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setenv("LITESPARK_UNPAD_CPU", "1")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = tiny_model("llama")
    litespark_hf.apply(eager)
    comp = copy.deepcopy(eager)
    litespark_hf.restore(comp)
    litespark_hf.apply(comp, compile_layers=True)
    assert all(layer._compiled_call_impl is not None for layer in comp.model.layers)
    for m in (eager, comp):
        m.train()
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for seq, cut in ((24, 17), (30, 11), (44, 3)):
        ids = random_batch(2, seq)
        mask = torch.ones_like(ids)
        mask[1, cut:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        outs = []
        for m in (eager, comp):
            m.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            outs.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
        assert torch.equal(outs[0][0], outs[1][0]), seq
        for a, b in zip(outs[0][1], outs[1][1]):
            assert torch.equal(a, b), seq
    counters = torch._dynamo.utils.counters
    assert not dict(counters["graph_break"])
    assert 1 <= counters["stats"]["unique_graphs"] <= 2
    litespark_hf.restore(comp)
    assert all(layer._compiled_call_impl is None for layer in comp.model.layers)


def test_reapply_and_restore_leave_user_compiled_layers(monkeypatch):
    monkeypatch.setenv("LITESPARK_COMPILE_BACKEND", "aot_eager")
    model = tiny_model("llama")
    litespark_hf.apply(model, compile_layers=True)
    litespark_hf.apply(model, compile_layers=False)  # another config: the layers are ours to uncompile
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)
    litespark_hf.restore(model)
    model.model.layers[0].compile(backend="aot_eager")  # the user's own compile
    litespark_hf.apply(model)
    litespark_hf.restore(model)
    assert model.model.layers[0]._compiled_call_impl is not None
    assert model.model.layers[1]._compiled_call_impl is None


def test_trainer_refuses_compile_layers_with_whole_model_compile(tmp_path):
    from litespark_hf import TrainingArguments
    from litespark_hf.trainer import _check_compile_layers

    class _T:
        pass

    t = _T()
    t.args = TrainingArguments(output_dir=str(tmp_path), use_litespark=True, use_cpu=True,
                               litespark_config='{"compile_layers": true}', torch_compile=True, report_to=[])
    with pytest.raises(ValueError, match="use one of them"):
        _check_compile_layers(t)
    t.args.torch_compile = False
    t.is_fsdp_enabled = True
    with pytest.raises(ValueError, match="not supported under FSDP or DeepSpeed"):
        _check_compile_layers(t)
    t.is_fsdp_enabled = False
    _check_compile_layers(t)  # one device: fine
