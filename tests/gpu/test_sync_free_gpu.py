"""A Litespark training step with the EfficiencyCallback never waits for the GPU (so the host can run ahead).

CUDA's sync debug mode (``torch.cuda.set_sync_debug_mode("warn")``) warns at every operation that makes the host
wait for the device (``.item()``, ``.tolist()``, ``nonzero``, a device-wide synchronize, ...). A callback turns it
on from ``on_step_begin`` to the end of ``on_step_end`` of steps 3-6 (after the first steps' one-time probes and
autotuning), i.e. around the forward, backward, clipping, optimizer step and the EfficiencyCallback's bookkeeping;
logging (which reads the loss) happens after ``on_step_end`` and only at step 8.
"""

import json
import warnings

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_litespark_trainer_steps_do_not_wait_for_the_gpu(tmp_path):
    from datasets import Dataset
    from transformers import TrainerCallback

    import litespark_hf
    from litespark_hf.efficiency import EfficiencyCallback
    from tiny_models import random_batch, tiny_model

    ids = random_batch(batch=16, seq=128)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    class SyncWatch(TrainerCallback):
        def __init__(self):
            self.records, self.on = [], False
            self._catch = None

        def on_step_begin(self, args, state, control, **kw):
            self.non_blocking = trainer.accelerator.dataloader_config.non_blocking
            if 2 <= state.global_step < 6:
                self._catch = warnings.catch_warnings(record=True)
                self.records.append((state.global_step + 1, self._catch.__enter__()))
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **kw):
            if self._catch is not None:
                torch.cuda.set_sync_debug_mode("default")
                self._catch.__exit__(None, None, None)
                self._catch = None

    watch = SyncWatch()
    model = tiny_model("llama", hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=64).cuda()
    args = litespark_hf.TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, report_to=[], use_litespark=True,
        bf16=True, max_grad_norm=1.0, learning_rate=1e-3, optim="adamw_torch_fused", save_strategy="no",
        logging_steps=8)
    eff = EfficiencyCallback(track_energy=False, write_plot=False, write_model_card=False, warmup_steps=1)
    # the watch comes after the EfficiencyCallback: its on_step_end runs inside the watched window
    trainer = litespark_hf.Trainer(model=model, args=args, train_dataset=ds, callbacks=[eff, watch])
    try:
        trainer.train()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [(step, str(w.message).splitlines()[0], w.filename, w.lineno) for step, rec in watch.records
             for w in rec if "called a synchronizing" in str(w.message)]
    print(json.dumps(syncs, indent=1))
    assert len(watch.records) == 4
    assert syncs == []
    # batches were copied with non_blocking=True during train(), and the setting was put back afterwards
    assert watch.non_blocking is True and trainer.accelerator.dataloader_config.non_blocking is False
    # and the figures are still right: every token counted, a GPU time per step
    rep = json.loads((tmp_path / "efficiency.json").read_text())
    assert rep["training"]["tokens_seen"] == 8 * 2 * 128
    assert all(s["time"] > 0 for s in eff._steps) and len(eff._steps) == 8
    assert rep["training"]["tokens_per_second_steady"] > 0


@pytest.mark.parametrize("mode", ["padded", "padding_free"])
def test_trl_sft_decoder_forward_does_not_wait_for_the_gpu(tmp_path, mode):
    """TRL's SFTTrainer with ``use_litespark``: the decoder stack's forward (embedding, mask creation, unpadding,
    layers) runs no synchronizing operation on padded batches (the real-token count comes from the collator,
    `unpadding.TokenCountingCollator`; the gather is ``nonzero_static``) and on padding-free ones (documents from
    ``cu_seq_lens_q``). So the host launches the next forward while the GPU still runs the previous optimizer step.
    (TRL's own metrics and its fused LM head still read device values after the stack: stock does the same.)
    The layers run eagerly here (``cuda_graphs`` off): a CUDA-graph capture synchronizes once per new length bucket,
    and these random lengths keep meeting new ones."""
    from datasets import Dataset

    import litespark_hf
    from litespark_hf.efficiency import post_data as PD
    from litespark_hf.patching import unwrap_model
    from tiny_models import tiny_model

    g = torch.Generator().manual_seed(3)
    lengths = [int(n) for n in torch.randint(8, 120, (32,), generator=g)]
    ds = Dataset.from_dict({"input_ids": [torch.randint(4, 256, (n,), generator=g).tolist() for n in lengths]})
    model = tiny_model("llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=64).cuda()
    extra = {"padding_free": True, "max_length": None} if mode == "padding_free" else {"max_length": 128}
    args = litespark_hf.SFTConfig(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, report_to=[], use_litespark=True,
        litespark_config={"cuda_graphs": False}, bf16=True, learning_rate=1e-3, save_strategy="no", logging_steps=6,
        **extra)
    trainer = litespark_hf.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=PD.id_tokenizer(256))
    records, forwards = [], []

    def enter(module, a, kw):
        forwards.append(kw.get("attention_mask") is not None or kw.get("cu_seq_lens_q") is not None)
        if len(forwards) > 2:  # after the first steps' one-time probes and autotuning
            catch = warnings.catch_warnings(record=True)
            records.append((catch, catch.__enter__()))
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def leave(module, a, kw, out):
        if len(forwards) > 2:
            torch.cuda.set_sync_debug_mode("default")
            records[-1][0].__exit__(None, None, None)

    stack = unwrap_model(trainer.model).model
    stack.register_forward_pre_hook(enter, with_kwargs=True, prepend=True)
    stack.register_forward_hook(leave, with_kwargs=True)
    try:
        trainer.train()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [(str(w.message).splitlines()[0], w.filename, w.lineno) for _, rec in records for w in rec
             if "called a synchronizing" in str(w.message)]
    print(json.dumps(syncs, indent=1))
    assert len(records) >= 3 and all(forwards)  # padded masks / boundaries reached the stack
    assert syncs == []
