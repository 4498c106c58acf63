"""The LM head and causal-LM forward that train on the fused linear cross-entropy (no logits)."""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

import litespark_kernels as lk
from litespark_kernels._dispatch import warn_once

from ..casting import _cast_of, cast_projection_weights, drop_casts
from ._swap import original_class
from .embedding import LitesparkEmbedding


@functools.lru_cache(maxsize=None)
def _forward_reads_softcap(cls: type) -> bool:
    """Whether ``cls.forward`` reads ``final_logit_softcapping`` (``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``;
    not 5.23's ``Gemma3ForConditionalGeneration``, which ignores its text config's)."""
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    return code is not None and "final_logit_softcapping" in code.co_names


class LitesparkLMHead:
    """``nn.Linear`` LM head that, given labels, returns the fused linear cross-entropy loss instead of logits.

    The loss is computed inside the head's own ``forward`` so that sharding wrappers which gather a module's
    parameters around its forward (DeepSpeed ZeRO-3, FSDP) see the weight used; without labels it is a plain linear.
    """

    def litespark_cast_groups(self) -> dict[str, list[nn.Linear]]:
        """The weight whose low-precision copy the fused loss reads (for `cast_projection_weights`)."""
        return {"lm_head": [self]}

    def forward(self, input, labels=None, shift_labels=None, num_items_in_batch=None, label_count=None,
                tied_grad=None, softcap=None):
        """``softcap``: the model's final-logit soft-cap, applied to the logits inside the fused loss (the logits
        returned without labels are the plain linear's, as stock's head returns them before its model caps)."""
        if labels is None and shift_labels is None:
            return F.linear(input, self.weight, self.bias)
        return lk.fused_linear_cross_entropy(
            input, self.weight, labels, bias=self.bias, shift_labels=shift_labels,
            num_items_in_batch=num_items_in_batch, label_count=label_count, tied_grad=tied_grad,
            weight_cast=_cast_of(self, "lm_head"), softcap=softcap,
        )


class LitesparkCausalLM:
    """Causal-LM model whose training loss is the fused linear cross-entropy (no [tokens, vocab] logits).

    Used only in training with labels and a Litespark LM head; evaluation, generation and any other call run the
    stock forward (which returns logits). Honours ``shift_labels``, ``ignore_index=-100`` and ``num_items_in_batch``
    exactly like transformers' ``ForCausalLMLoss``.

    ``final_logit_softcapping`` (Gemma2; Gemma3 can set it), which ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM``
    apply as ``cap * tanh(logits / cap)`` before their loss, goes into the fused loss (``softcap=``) when it is on
    the model's own config and the stock forward reads it. Any other config carrying one (set only on a multimodal
    wrapper's ``text_config``, or on a class whose forward does not read it) keeps the stock loss on the stock
    forward's logits (warned once): the fused loss never drops a cap stock applies, nor adds one.

    Where the stock forward's parameters differ from these (multimodal wrappers: ``pixel_values``,
    ``token_type_ids``, ...), the swapped class's forward carries the stock signature and binds its arguments by it,
    so that positional calls, ``generate``'s argument check and the Trainer's unused-column removal (which read
    ``inspect.signature(model.forward)``) see the stock model's parameters; they reach the stock forward or, in the
    fused path, ``self.model``.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        original = cls.__dict__.get("__litespark_original__")  # set on the classes `swapped_class` builds
        if original is None or "forward" in cls.__dict__:
            return
        stock = inspect.signature(original.forward)
        mixin_forward = cls.forward
        if list(stock.parameters) == list(inspect.signature(mixin_forward).parameters):
            return
        names = [n for n, p in stock.parameters.items() if p.kind is not p.VAR_KEYWORD]
        var_keyword = next((n for n, p in stock.parameters.items() if p.kind is p.VAR_KEYWORD), None)

        def forward(self, *args, **kwargs):
            if args:  # positional arguments in the stock order
                bound = stock.bind_partial(self, *args, **kwargs).arguments
                kwargs = {**{n: bound[n] for n in names[1:] if n in bound}, **bound.get(var_keyword, {})}
            return mixin_forward(self, **kwargs)

        forward.__signature__ = stock
        forward.__doc__ = original.forward.__doc__
        cls.forward = forward

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """The stock ``save_pretrained``, with the stock class in the config's ``architectures``.

        transformers writes ``type(self).__name__`` there (minus an ``FSDP`` prefix), which is ``Litespark<Name>`` for
        a swapped model: the saved directory would name a class no one else has. The config is rewritten with the
        stock class's name (``litespark_hf.restore`` gives the model back its class; the weights are the stock ones).
        With ``push_to_hub=True`` the upload goes through ``push_to_hub``, which saves through this method."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        stock = getattr(type(self), "__litespark_original__", None)  # inherited by FSDP2's FSDP<class>
        if stock is not None and kwargs.get("is_main_process", True):
            self.config.architectures = [stock.__name__]
            self.config.save_pretrained(save_directory)
        if push_to_hub:
            hub = {k: kwargs[k] for k in ("repo_id", "commit_message", "private", "token", "create_pr",
                                          "revision", "commit_description") if k in kwargs}
            hub.setdefault("repo_id", str(save_directory).rstrip("/").split("/")[-1])
            self.push_to_hub(**hub)
        return out

    def _litespark_head(self):
        """How the fused loss reads the head: 'litespark' (a `LitesparkLMHead`, the loss in its own forward), 'linear'
        (a plain head whose weight the loss reads; families override), or None (the stock forward)."""
        return "litespark" if isinstance(self.lm_head, LitesparkLMHead) else None

    def _litespark_final_hidden(self, hidden):
        """The hidden states the head reads (families with a logit scaling override: Granite)."""
        return hidden

    def _litespark_logit_softcap(self):
        """``final_logit_softcapping`` of the model's (text) config, or None."""
        cfg = self.config
        cap = getattr(cfg, "final_logit_softcapping", None)
        text = getattr(cfg, "get_text_config", None)
        if cap is None and callable(text):
            cap = getattr(text(), "final_logit_softcapping", None)
        return cap

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        shift_labels = kwargs.get("shift_labels")
        head = self._litespark_head() if self.training and (labels is not None or shift_labels is not None) else None
        fused = head is not None
        softcap = None
        if fused and (cap := self._litespark_logit_softcap()) is not None:
            stock = original_class(self)
            if (getattr(self.config, "final_logit_softcapping", None) is not None and stock is not None
                    and _forward_reads_softcap(stock)):
                softcap = cap  # the stock forward's cap * tanh(logits / cap), inside the fused loss
            else:
                warn_once("fused_cross_entropy", f"final_logit_softcapping={cap} is on a config the fused loss does "
                                                 "not read it from: the stock loss (on the stock logits) runs")
                fused = False
        if not fused:
            return super().forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                logits_to_keep=logits_to_keep, **kwargs,
            )
        shift_labels = kwargs.pop("shift_labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("ignore_index", None)
        if shift_labels is None:
            shift_labels = lk.shifted_labels(labels)
        # started before the decoder so that the loss reads a finished copy instead of syncing (LabelCount); not
        # under torch.compile (a pinned copy behind a CUDA event: a graph break; the compiled loss counts itself)
        label_count = lk.count_labels(shift_labels) \
            if shift_labels.is_cuda and not torch.compiler.is_compiling() else None
        given = cast_projection_weights(self, self.lm_head.weight.device.type)
        embed = self.get_input_embeddings()
        tied = None
        # not under torch.compile: the embedding takes the stock lookup there and the compiled loss ignores the slot
        # (and ``__dict__.pop`` in the ``finally`` below is a graph break for torch 2.11's Dynamo)
        if isinstance(embed, LitesparkEmbedding) and embed.weight is self.lm_head.weight \
                and not torch.compiler.is_compiling():
            tied = embed.__dict__["_litespark_tied"] = lk.TiedGrad()  # this forward's hand-over slot
        try:
            outputs = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
            )
            hidden = self._litespark_final_hidden(outputs.last_hidden_state)
            loss_kwargs = dict(shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                               label_count=label_count, tied_grad=tied, softcap=softcap)
            if head == "litespark":
                loss = self.lm_head(hidden, **loss_kwargs)
            else:
                loss = lk.fused_linear_cross_entropy(hidden, self.lm_head.weight, **loss_kwargs)
        finally:
            drop_casts(given)
            if tied is not None:
                embed.__dict__.pop("_litespark_tied", None)
        return CausalLMOutputWithPast(
            loss=loss, logits=None, past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )
