"""Tied LM heads in vLLM's in-place reload: re-tie after every reload (see `retie_lm_head`)."""

from __future__ import annotations

import logging
from typing import Any


class _TiedHeadFilter(logging.Filter):
    """Drops "ParallelLMHead: Failed to load weights": a tied head has no tensor of its own to load, and
    `retie_lm_head` rebuilds it from the reloaded embedding after every reload (an untied head that
    misses its weight fails the `_check_complete` and checksum proofs instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).endswith("Failed to load weights") and record.args == ("ParallelLMHead",))


# Module level, so it is installed in every process that reloads weights through the rollout actor.
logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_TiedHeadFilter())


def retie_lm_head(worker: Any) -> bool:
    """In each vLLM worker of a tied model: make the LM head compute with the reloaded embedding again.

    With tie_word_embeddings the head shares the embedding's Parameter and the checkpoint (and our
    broadcast) has no lm_head.weight, so vLLM's layer-wise reload never processes the head: it puts
    the head's old tensors back ("ParallelLMHead: Failed to load weights"). The shared Parameter then
    holds the new values, but on CPU the head computes through a oneDNN copy packed at the previous
    load (`cpu_linear`), so vLLM kept sampling from the old head while the checksums of the
    parameters passed. Re-tying and re-running the head's post-load processing repacks it from the
    new embedding; on GPU that processing is a no-op. Returns whether the model is tied.
    """
    model = worker.model_runner.get_model()
    head, inner = getattr(model, "lm_head", None), getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if not getattr(model.config, "tie_word_embeddings", False) or head is None or embed is None:
        return False
    if head.weight is not embed.weight:
        head.weight = embed.weight
    head.quant_method.process_weights_after_loading(head)
    return True
