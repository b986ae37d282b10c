"""Make the e2e test's model locally: a tiny random-weight Llama and a word-level tokenizer.

    python tests/integrations/e2e/make_tiny_model.py OUT_DIR

No model hub: the architecture is tests/integrations/tiny_model/config.json (fp32 and head_dim 32
here: vLLM's CPU backend), the weights come from a fixed seed (the same files every run), and the
tokenizer is built with the ``tokenizers`` library over a vocabulary of made-up words ``w3`` ..
``w1023`` (ids 0-2 are ``<unk>``, ``<s>``, ``</s>``), so that a prompt of N words is N tokens (+
BOS).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "tiny_model" / "config.json"
SEED = 1234


def make(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = json.loads(CONFIG.read_text())
    cfg["torch_dtype"] = "float32"
    # vLLM's CPU attention kernels have no head_dim 16 ("Unsupported CPU attention
    # configuration"): 32, with the hidden size to match
    cfg.update(hidden_size=128, head_dim=32, intermediate_size=256)
    # larger weights than the default 0.02: peaked logits, so greedy choices are clear-cut
    cfg["initializer_range"] = 0.5
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, cfg["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return out


if __name__ == "__main__":
    print(make(Path(sys.argv[1])))
