"""Shared fixtures: tiny random models of every supported architecture, and the device option."""

from __future__ import annotations

import os

import pytest
import torch

# Tiny models gain nothing from a second thread, and on a busy machine threads that wait for each
# other make small ops up to 50x slower; notebook kernels and JupyterLab inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for the tests that take the device fixture: cpu or cuda")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("--device cuda was asked for but CUDA is not available")
    return dev


VOCAB = 128


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM; widths are multiples of 8 so every N:M pattern fits."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    elif arch == "opt":
        cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=128, word_embed_proj_dim=64)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                                  sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    elif arch == "mamba":
        cfg = tf.MambaConfig(vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2,
                             conv_kernel=4, time_step_rank=8)
    else:
        raise ValueError(arch)
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


ARCHS = ["llama", "opt", "gpt2", "gemma3", "mamba"]


@pytest.fixture
def calib() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (8, 32), generator=g)


def word_tokenizer(n_words: int):
    """A word-level tokenizer over ``w0 .. w{n-1}`` built offline, with BOS/EOS/UNK."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(n_words)]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def word_llama(tokenizer, max_positions: int = 128):
    """A seeded tiny Llama sized to ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg).eval()
