"""The saved transformers models as plain traceable torch modules, for the engines that export a
graph (ONNX Runtime through torch.onnx.export, OpenVINO through openvino.convert_model).

Both wrap transformers' own model (eager attention, so the traced graph holds the MatMul/Softmax
pattern the engines' fusions look for) and take only tensors: the TorchScript tracer and OpenVINO's
converter cannot pass keyword arguments or a Cache object.

- BertEncoder(model_dir): (input_ids, attention_mask, token_type_ids), each (B, S) int64 ->
  last_hidden_state (B, S, hidden) fp32.
- GPT2Step(model_dir): (input_ids (1, T) int64, position_ids (1, T) int64, *past) -> (logits of
  the last position (1, vocab) fp32, *present), where past / present are 2 * n_layer tensors
  (key, value of each layer) of shape (1, heads, P, head_dim) / (1, heads, P + T, head_dim): one
  prefill (P = 0) or decode step over an explicit KV cache. OpenVINO makes the cache a state of
  the compiled model (openvino_engine).
"""

from __future__ import annotations

import inspect

import torch


class BertEncoder(torch.nn.Module):
    def __init__(self, model_dir: str):
        import transformers as tf

        super().__init__()
        self.bert = tf.BertModel.from_pretrained(model_dir, attn_implementation="eager", add_pooling_layer=False).eval()
        self.config = self.bert.config
        self.eval()  # no dropout (a fresh Module is in training mode, and export restores the mode)

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state


class GPT2Step(torch.nn.Module):
    def __init__(self, model_dir: str):
        import transformers as tf

        super().__init__()
        self.gpt2 = tf.GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager").eval()
        self.config = self.gpt2.config
        self.eval()
        # transformers renames past_key_values to cache (5.2x; the old name warns, then goes in 5.40)
        self.cache_kw = "cache" if "cache" in inspect.signature(self.gpt2.forward).parameters else "past_key_values"

    def forward(self, input_ids, position_ids, *past):
        import transformers as tf

        cache = tf.DynamicCache(config=self.config)
        for i, layer in enumerate(cache.layers):  # filled directly: update() would cat onto an empty 1-D tensor
            layer.lazy_initialization(past[2 * i], past[2 * i + 1])
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
        out = self.gpt2(input_ids=input_ids, position_ids=position_ids, use_cache=True, **{self.cache_kw: cache})
        present = []
        for layer in (getattr(out, "cache", None) or out.past_key_values).layers:
            present += [layer.keys, layer.values]
        return (out.logits[:, -1], *present)

    def example(self, prompt: int = 3, past: int = 5) -> tuple:
        """Example inputs for tracing: `prompt` new tokens after `past` cached ones."""
        c = self.config
        hd = c.n_embd // c.n_head
        return (torch.randint(0, c.vocab_size, (1, prompt)), torch.arange(past, past + prompt)[None],
                *[torch.randn(1, c.n_head, past, hd) for _ in range(2 * c.n_layer)])


def bert_example(vocab: int, batch: int = 2, seq: int = 17) -> tuple:
    """Example (input_ids, attention_mask, token_type_ids) for tracing BertEncoder."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids), torch.zeros_like(ids)
