"""The Hugging Face models of the tied-head coordinate check (built from configs, random init, no downloads).

Heads are fixed (4), so head_dim grows with the width; one layer; the shipped character vocabulary (96 symbols).
Used as ``mupderive coord-check RULE --model docs/coord_check/hf/models.py:gpt2`` (or ``:llama``).
"""

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def gpt2(width: int) -> GPT2LMHeadModel:
    """GPT-2 (Conv1D layers, tied lm_head), dropout off."""
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=width, n_layer=1, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=0))


def llama(width: int) -> LlamaForCausalLM:
    """Llama (RMSNorm, SwiGLU, rotary, grouped-query attention), tie_word_embeddings=True."""
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=width, intermediate_size=4 * width,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32, tie_word_embeddings=True, bos_token_id=0,
                                        eos_token_id=0))
